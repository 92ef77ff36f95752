"""``dataset=folder``: a folder of the user's own images and masks, written here as real JPEG / PNG / TIFF files.

Each test writes the labels it expects next to the files and compares what the data set reads with them: index PNGs
(palette, ``L``, 16-bit), RGB colour-coded masks through ``dataset.palette``, ADE20K-style ``reduce_zero_label``,
grayscale and RGBA images. Every bad input ends in one line naming the file. The commands of docs/datasets.md's
section run on such a folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from segjml.data import DataError, ImageMaskFolder, build_dataset
from tests.helpers import ROOT, compose_config, run_in_process

CLASSES = ["a", "b", "c"]
H, W = 32, 40
PALETTE = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]  # the colour of each class in the RGB-mask variant
SPLITS = {"train": 8, "val": 4}


def label_map(rng: np.random.Generator, num_values: int) -> np.ndarray:
    """Blocks of random class ids (so that cropping and flipping keep whole regions), a few ignored pixels."""
    blocks = rng.integers(0, num_values, (4, 5))
    label = np.kron(blocks, np.ones((H // 4, W // 5), dtype=np.int64)).astype(np.uint8)
    label[0, :3] = 255
    return label


def write_folder(root: Path, masks: str = "index", reduce_zero: bool = False, seed: int = 0) -> dict[str, list]:
    """``root/images/<split>/<name>.jpg`` and ``root/masks/<split>/<name>.png`` for ``SPLITS``; returns the class ids
    each split's masks stand for, in file-name order.

    ``masks``: ``index`` (palette PNGs, and one ``L`` PNG per split), ``rgb`` (colours of ``PALETTE``) or ``16bit``
    (PNG ``I;16``). ``reduce_zero``: the masks store class ``k`` as ``k + 1`` and 0 for "other" (ignored).
    """
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {}
    for split, n in SPLITS.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        expected[split] = []
        for i in range(n):
            name = f"{split}_{i:02d}"
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            label = label_map(rng, len(CLASSES))
            stored = label.copy()
            if reduce_zero:
                stored = np.where(label == 255, 0, label + 1).astype(np.uint8)  # "other" (0) where ignored,
                stored[0, 2] = 255  # and one pixel ignored as such
            path = root / "masks" / split / f"{name}.png"
            if masks == "rgb":
                label = np.where(label == 255, 0, label).astype(np.uint8)  # RGB masks here have no ignore colour
                Image.fromarray(np.asarray(PALETTE, dtype=np.uint8)[label]).save(path)
            elif masks == "16bit":
                Image.fromarray(stored.astype(np.uint16)).save(path)  # mode I;16
            elif i == 0:
                Image.fromarray(stored, mode="L").save(path)
            else:
                img = Image.fromarray(stored, mode="P")
                img.putpalette([v for c in PALETTE for v in c] + [128] * (256 - len(PALETTE)) * 3)
                img.save(path)
            expected[split].append(label)
    return expected


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, list]]:
    root = tmp_path / "mine"
    return root, write_folder(root)


def loaded_labels(dataset: ImageMaskFolder) -> list[np.ndarray]:
    return [dataset.load(i)[1] for i in range(len(dataset))]


def assert_same_labels(dataset: ImageMaskFolder, expected: list[np.ndarray]) -> None:
    labels = loaded_labels(dataset)
    assert len(labels) == len(expected)
    for got, want in zip(labels, expected):
        assert got.dtype == np.uint8 and np.array_equal(got, want)


# --- reading -------------------------------------------------------------------------------------------------------


def test_index_masks_are_the_class_ids_in_both_splits(folder):
    root, expected = folder
    for split in SPLITS:
        dataset = ImageMaskFolder(root, split, CLASSES)
        assert [image.name for image, _ in dataset.samples] == [f"{split}_{i:02d}.jpg" for i in range(SPLITS[split])]
        assert dataset.num_classes == 3 and dataset.class_names == CLASSES
        assert_same_labels(dataset, expected[split])
        image, label = dataset[0]
        assert tuple(image.shape) == (3, H, W) and tuple(label.shape) == (H, W)


def test_the_config_counts_the_classes_from_a_list_or_a_file_and_builds_both_splits(folder, tmp_path):
    root, expected = folder
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n\nc\n")  # a blank line is no class
    for classes in ("[a,b,c]", str(names)):
        cfg = compose_config(["dataset=folder", f"dataset.root={root}", f"dataset.classes={classes}"], tmp_path)
        assert cfg.dataset.num_classes == 3 and cfg.model.num_classes == 3
        val = build_dataset(cfg.dataset, "val")
        assert val.class_names == CLASSES
        assert_same_labels(val, expected["val"])
        assert len(build_dataset(cfg.dataset, "train")) == SPLITS["train"]
    cfg = compose_config(["dataset=folder", "dataset.classes=[x,y,z,w,v]"], tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True)["dataset"]["num_classes"] == 5


def test_rgb_masks_are_read_through_the_palette(tmp_path):
    root = tmp_path / "rgb"
    expected = write_folder(root, masks="rgb", seed=1)
    dataset = ImageMaskFolder(root, "train", CLASSES, palette=[list(c) for c in PALETTE])
    assert_same_labels(dataset, expected["train"])
    assert dataset.palette == tuple(PALETTE)  # the colours predictions are drawn with


def test_reduce_zero_label_ignores_zero_and_moves_every_class_down(tmp_path):
    root = tmp_path / "ade_like"
    expected = write_folder(root, reduce_zero=True, seed=2)
    dataset = ImageMaskFolder(root, "val", CLASSES, reduce_zero_label=True)
    assert_same_labels(dataset, expected["val"])
    assert 255 in np.unique(loaded_labels(dataset)[0])  # the stored 0 ("other") pixels


def test_reduce_zero_label_with_a_palette_gives_zero_its_colour_first(tmp_path):
    root = tmp_path / "rgb_zero"
    write_folder(root, masks="rgb", seed=3)
    # PALETTE[0] (black) is now "other": pixels of the first class are ignored, the two others are classes 0 and 1
    dataset = ImageMaskFolder(root, "val", ["b", "c"], palette=PALETTE, reduce_zero_label=True)
    raw = np.asarray(Image.open(dataset.samples[0][1]).convert("RGB"))
    want = np.full((H, W), 255, np.uint8)
    for cls, colour in enumerate(PALETTE[1:]):
        want[(raw == colour).all(-1)] = cls
    assert np.array_equal(dataset.load(0)[1], want)
    assert dataset.palette == tuple(PALETTE[1:])


def test_16_bit_masks_are_read(tmp_path):
    root = tmp_path / "deep"
    expected = write_folder(root, masks="16bit", seed=4)
    assert Image.open(next((root / "masks" / "val").glob("*.png"))).mode == "I;16"
    assert_same_labels(ImageMaskFolder(root, "val", CLASSES), expected["val"])


def test_grayscale_images_are_repeated_to_rgb_and_rgba_images_lose_alpha(folder):
    root, expected = folder
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    images = root / "images" / "val"
    for name in ("val_00", "val_01"):
        (images / f"{name}.jpg").unlink()
    Image.fromarray(gray, mode="L").save(images / "val_00.png")
    Image.fromarray(rgba, mode="RGBA").save(images / "val_01.png")
    dataset = ImageMaskFolder(root, "val", CLASSES)
    (gray_image, label0), (rgba_image, label1) = dataset.load(0), dataset.load(1)
    assert np.array_equal(gray_image, np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(rgba_image, rgba[..., :3])
    assert np.array_equal(label0, expected["val"][0]) and np.array_equal(label1, expected["val"][1])


def test_any_image_suffix_in_any_case_other_folder_names_and_a_mask_suffix(tmp_path):
    root = tmp_path / "tiff"
    rng = np.random.default_rng(6)
    want = {}
    for i, suffix in enumerate((".TIF", ".tiff", ".bmp", ".JPEG")):
        image = rng.integers(0, 256, (H + i, W, 3), dtype=np.uint8)  # images of any size
        (root / "img" / "val").mkdir(parents=True, exist_ok=True)
        (root / "gt" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "img" / "val" / f"s{i}{suffix}")
        label = rng.integers(0, 3, (H + i, W), dtype=np.uint8)
        Image.fromarray(label, mode="L").save(root / "gt" / "val" / f"s{i}_mask.png")
        want[f"s{i}{suffix}"] = (image, label)
    dataset = ImageMaskFolder(root, "val", CLASSES, images_dir="img", masks_dir="gt", mask_suffix="_mask.png")
    assert sorted(p.name for p, _ in dataset.samples) == sorted(want)
    for i, (image_path, _) in enumerate(dataset.samples):
        image, label = dataset.load(i)
        if image_path.suffix.lower() != ".jpeg":  # lossless formats come back exactly
            assert np.array_equal(image, want[image_path.name][0])
        assert np.array_equal(label, want[image_path.name][1])


def test_split_lists_choose_the_images_in_their_order(folder, tmp_path):
    root, expected = folder
    listing = tmp_path / "few.txt"
    listing.write_text("train_03\n\ntrain_01.jpg\n")  # a name with or without its suffix
    dataset = ImageMaskFolder(root, "train", CLASSES, split_list=listing)
    assert [p.name for p, _ in dataset.samples] == ["train_03.jpg", "train_01.jpg"]
    assert_same_labels(dataset, [expected["train"][3], expected["train"][1]])
    # one folder of every image, the splits given by lists only
    flat = tmp_path / "flat"
    for kind in ("images", "masks"):
        (flat / kind).mkdir(parents=True)
        for path in (root / kind / "val").iterdir():
            path.rename(flat / kind / path.name)
    (tmp_path / "val.txt").write_text("val_02\nval_00\n")
    dataset = ImageMaskFolder(flat, "val", CLASSES, split_list=tmp_path / "val.txt")
    assert_same_labels(dataset, [expected["val"][2], expected["val"][0]])


# --- bad input: one line naming the file ----------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_image_without_mask_and_mask_without_image(folder):
    root, _ = folder
    mask = root / "masks" / "train" / "train_02.png"
    mask.unlink()
    with pytest.raises(DataError) as err:
        ImageMaskFolder(root, "train", CLASSES)
    image = root / "images" / "train" / "train_02.jpg"
    assert one_line(err) == f"image {image} has no mask: {mask} is missing"
    image.unlink()
    stray = root / "masks" / "val" / "extra.png"
    Image.fromarray(np.zeros((H, W), np.uint8), mode="L").save(stray)
    assert len(ImageMaskFolder(root, "train", CLASSES)) == SPLITS["train"] - 1
    with pytest.raises(DataError) as err:
        ImageMaskFolder(root, "val", CLASSES)
    assert one_line(err) == f"mask {stray} has no image in {root / 'images' / 'val'}"


def test_a_mask_value_outside_the_classes_names_file_value_and_place(folder):
    root, _ = folder
    dataset = ImageMaskFolder(root, "val", CLASSES)
    path = dataset.samples[1][1]
    bad = np.asarray(Image.open(path)).copy()
    bad[5, 7] = 3
    Image.fromarray(bad, mode="L").save(path)
    with pytest.raises(DataError) as err:
        dataset.load(1)
    assert one_line(err) == (
        f"mask {path} holds value 3 at (7, 5), which is neither a class id (0-2) nor the ignore value 255; "
        "dataset.classes names 3 classes"
    )
    zero = ImageMaskFolder(root, "val", CLASSES, reduce_zero_label=True)  # 3 is class 2 now; 255 stays ignored
    assert zero.load(1)[1][5, 7] == 2
    bad[6, 8] = 4
    Image.fromarray(bad.astype(np.uint16)).save(path)
    with pytest.raises(DataError) as err:
        zero.load(1)
    assert one_line(err) == (
        f"mask {path} holds value 4 at (8, 6), which is neither a class id (1-3, 0 being ignored) nor the ignore "
        "value 255; dataset.classes names 3 classes"
    )


def test_image_and_mask_of_different_sizes(folder):
    root, _ = folder
    dataset = ImageMaskFolder(root, "val", CLASSES)
    image, mask = dataset.samples[2]
    Image.fromarray(np.zeros((H, W + 1), np.uint8), mode="L").save(mask)
    with pytest.raises(DataError) as err:
        dataset.load(2)
    assert one_line(err) == f"image {image} is {W}x{H} but its label {mask} is {W + 1}x{H}"


def test_empty_split_missing_split_folder_and_missing_root(folder, tmp_path):
    root, _ = folder
    (root / "images" / "test").mkdir()
    (root / "masks" / "test").mkdir()
    with pytest.raises(DataError) as err:
        ImageMaskFolder(root, "test", CLASSES)
    assert one_line(err) == (
        f"split 'test' is empty: {root / 'images' / 'test'} holds no image (.jpg, .jpeg, .png, .tif, .tiff, .bmp)"
    )
    with pytest.raises(DataError) as err:
        ImageMaskFolder(root, "extra", CLASSES)
    assert one_line(err) == f"expected directory {root / 'images' / 'extra'} is missing"
    with pytest.raises(DataError) as err:
        ImageMaskFolder(tmp_path / "nowhere", "train", CLASSES)
    assert one_line(err) == f"data root {tmp_path / 'nowhere'} does not exist"


def test_a_colour_not_in_the_palette_names_colour_place_and_file(tmp_path):
    root = tmp_path / "rgb"
    write_folder(root, masks="rgb", seed=7)
    dataset = ImageMaskFolder(root, "val", CLASSES, palette=PALETTE)
    path = dataset.samples[0][1]
    rgb = np.asarray(Image.open(path)).copy()
    rgb[4, 9] = (255, 255, 0)
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as err:
        dataset.load(0)
    assert one_line(err) == f"mask {path} holds colour (255, 255, 0) at (9, 4), which is not in dataset.palette"


def test_bad_classes_and_palettes(folder, tmp_path):
    root, _ = folder
    with pytest.raises(DataError) as err:
        ImageMaskFolder(root, "val", str(tmp_path / "classes.txt"))
    assert one_line(err) == (
        f"classes file {tmp_path / 'classes.txt'} does not exist; give dataset.classes as a list ([a,b,c]) or a text "
        "file with one class name per line"
    )
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=re.escape(f"classes file {tmp_path / 'blank.txt'} names no class")):
        ImageMaskFolder(root, "val", str(tmp_path / "blank.txt"))
    with pytest.raises(DataError) as err:
        ImageMaskFolder(root, "val", CLASSES, palette=PALETTE[:2])
    assert one_line(err) == (
        "dataset.palette has 2 colours but the masks hold 3 values: one colour per class of dataset.classes"
    )
    with pytest.raises(DataError, match="gives two mask values the same colour"):
        ImageMaskFolder(root, "val", CLASSES, palette=[(0, 0, 0), (0, 0, 0), (1, 2, 3)])
    with pytest.raises(DataError, match=re.escape("must be a list of [r, g, b] colours, each value 0-255")):
        ImageMaskFolder(root, "val", CLASSES, palette=[(0, 0, 0), (0, 0, 256), (1, 2, 3)])


def test_bad_split_lists_same_named_images_and_class_lists(folder, tmp_path):
    root, _ = folder
    images = root / "images" / "train"

    def message(**kwargs) -> str:
        with pytest.raises(DataError) as err:
            ImageMaskFolder(root, "train", kwargs.pop("classes", CLASSES), **kwargs)
        return one_line(err)

    listing = tmp_path / "train.txt"
    assert message(split_list=listing) == f"split list {listing} does not exist"
    listing.write_text("train_00\ntrain_99\n")
    assert message(split_list=listing) == f"image 'train_99' listed in {listing} is not in {images}"
    listing.write_text("\n")
    assert message(split_list=listing) == (
        f"split 'train' is empty: {listing} names no image (.jpg, .jpeg, .png, .tif, .tiff, .bmp)"
    )
    assert message(classes=[]) == (
        "dataset.classes is empty; name every class ([a,b,c]) or give a file with one name per line"
    )
    assert message(classes=3) == (
        "dataset.classes=3 is not a list of class names; give them as a list ([a,b,c]) or a text file with one name "
        "per line"
    )
    assert message(palette=PALETTE, reduce_zero_label=True) == (
        "dataset.palette has 3 colours but the masks hold 4 values: one colour per class of dataset.classes (the "
        "first is the colour of 0, which dataset.reduce_zero_label ignores)"
    )
    Image.open(images / "train_04.jpg").save(images / "train_04.png")
    assert message() == (
        f"images {images / 'train_04.jpg'} and {images / 'train_04.png'} have the same name; keep one of them"
    )


def test_an_rgb_mask_without_a_palette_is_refused(tmp_path):
    root = tmp_path / "rgb"
    write_folder(root, masks="rgb", seed=8)
    dataset = ImageMaskFolder(root, "val", CLASSES)
    with pytest.raises(DataError) as err:
        dataset.load(0)
    assert one_line(err) == f"label {dataset.samples[0][1]} is a RGB image; expected a single-channel or palette PNG"


# --- the commands of docs/datasets.md ---------------------------------------------------------------------------------

FAST = [
    "trainer.max_iters=3",
    "trainer.batch_size=2",
    "trainer.num_workers=0",
    "trainer.progress=false",
    "trainer.device=cpu",
    "dataset.crop_size=[32,32]",
    "pretrained=false",  # the recipe asks for ImageNet weights, which tests cannot download
    "logger=none",
]


def documented_commands() -> list[str]:
    """The command lines of the ``dataset=folder`` section of docs/datasets.md."""
    text = (ROOT / "docs" / "datasets.md").read_text()
    section = text.split("## Your own images and masks", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r"^\s*(python .*?)(?:\s+#.*)?$", section, re.M)
    return [line for line in lines if "dataset=folder" in line]


def run(command: str, data: Path, *extra: str) -> subprocess.CompletedProcess:
    """``command`` (``python ...``) with the docs' ``/data`` replaced by ``data``, then ``extra`` overrides."""
    args = [arg.replace("/data/", f"{data}/") for arg in shlex.split(command)]
    return subprocess.run([sys.executable, *args[1:], *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_documented_commands_train_and_validate_a_folder(tmp_path, capsys):
    """Each command composed and run in this process (``train.py``'s and the validator's own functions); the next test
    runs ``train.py`` as a process."""
    from segjml.data.validate import main as validate_main

    commands = documented_commands()
    train = [c for c in commands if c.startswith("python train.py")]
    validate = [c for c in commands if "segjml.data.validate" in c]
    assert len(train) >= 3 and validate
    write_folder(tmp_path / "mine")
    write_folder(tmp_path / "rgb", masks="rgb", seed=1)
    write_folder(tmp_path / "ade_like", reduce_zero=True, seed=2)

    def args(command: str) -> list[str]:
        return [arg.replace("/data/", f"{tmp_path}/") for arg in shlex.split(command)]

    assert args(validate[0])[:3] == ["python", "-m", "segjml.data.validate"]
    assert validate_main([*args(validate[0])[3:], f"paths.log_dir={tmp_path / 'logs'}"]) == 0
    assert f"folder: {sum(SPLITS.values())} samples scanned, 0 bad" in capsys.readouterr().out
    for i, command in enumerate(train):
        out = tmp_path / f"out{i}"
        run_in_process("train.py", [*args(command)[2:], *FAST], out)
        assert (out / "checkpoints" / "last.pt").is_file(), command
        metrics = (out / "metrics.json").read_text()
        assert '"class_names": [' in metrics and '"a"' in metrics and '"miou"' in metrics, command


def test_a_bad_folder_stops_train_with_one_line_and_exit_code_2(tmp_path):
    root = tmp_path / "mine"
    write_folder(root)
    image = root / "images" / "val" / "val_01.jpg"
    mask = root / "masks" / "val" / "val_01.png"
    mask.unlink()
    command = "python train.py dataset=folder dataset.root=/data/mine dataset.classes=[a,b,c]"
    proc = run(command, tmp_path, *FAST, f"paths.log_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: image {image} has no mask: {mask} is missing"]
    missing = run(
        "python -m segjml.data.validate dataset=folder dataset.root=/data/mine dataset.classes=/data/none.txt", tmp_path
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: classes file {tmp_path / 'none.txt'} does not")


def test_a_checkpoint_config_keeps_the_class_names_and_predict_colours_of_the_folder(tmp_path):
    """The stored (resolved) config holds the names read from the classes file, which eval and predict use even where
    the file is gone, and predict colours the classes with ``dataset.palette`` (without 0's colour when ignored)."""
    from segjml.config import to_plain
    from segjml.engine.commands import dataset_class_names, dataset_palette

    names = tmp_path / "classes.txt"
    names.write_text("road\n\nbuilding\ntree\n")
    colours = [[0, 0, 0], [128, 64, 128], [70, 70, 70], [107, 142, 35]]
    cfg = compose_config(
        [
            "dataset=folder",
            f"dataset.root={tmp_path}",
            f"dataset.classes={names}",
            f"dataset.palette={colours}".replace(" ", ""),
            "dataset.reduce_zero_label=true",
        ]
    )
    stored = OmegaConf.create(to_plain(cfg.dataset))
    names.unlink()
    assert stored.num_classes == 3
    assert dataset_class_names(stored) == ["road", "building", "tree"]
    assert dataset_palette(stored) == [(128, 64, 128), (70, 70, 70), (107, 142, 35)]
