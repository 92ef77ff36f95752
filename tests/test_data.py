"""Data sets in their distributed layouts: discovery, label mapping, folds, pipelines, bad input, preparation."""

import json
import random
import subprocess
import sys

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segjml.data import ADE20K, Cityscapes, DataError, DeepGlobeLand, PascalVOC
from segjml.data.deepglobe import fold_split
from segjml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchToDevice, RandomScaleCrop, train_transform
from segjml.labels import boundary_map
from tests.fixtures import DEEPGLOBE_COLOURS, write_ade20k, write_cityscapes, write_deepglobe, write_voc
from tests.helpers import ROOT, compose_config, run_in_process


# --- discovery and label mapping ----------------------------------------------------------------------------------
def test_cityscapes_layout_and_raw_id_mapping(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    train, val = Cityscapes(root, "train"), Cityscapes(root, "val")
    assert (len(train), len(val)) == (3, 2)
    image, label = train.load(0)
    raw = np.asarray(Image.open(train.samples[0][1]))
    assert image.shape == (32, 64, 3) and label.shape == (32, 64)
    assert (label[raw == 7] == 0).all() and (label[raw == 26] == 13).all() and (label[raw == 0] == 255).all()
    assert (label[raw == 33] == 18).all() and (label[raw == 9] == 255).all()  # bicycle; parking is ignored
    assert set(np.unique(label)) <= set(range(19)) | {255}


def test_cityscapes_prefers_train_id_pngs(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes", sizes=(("train", 1),))
    label_path = Cityscapes(root, "train").samples[0][1]
    train_ids = label_path.with_name(label_path.name.replace("_labelIds", "_labelTrainIds"))
    Image.fromarray(np.full((32, 64), 5, dtype=np.uint8), mode="L").save(train_ids)
    dataset = Cityscapes(root, "train")
    assert dataset.samples[0][1] == train_ids and (dataset.load(0)[1] == 5).all()


def test_voc_splits_and_palette_indices(tmp_path):
    voc, _ = write_voc(tmp_path)
    train, val = PascalVOC(voc, "train"), PascalVOC(voc, "val")
    assert (len(train), len(val)) == (2, 1)
    label = train.load(0)[1]
    stored = np.asarray(Image.open(train.samples[0][1]))
    assert Image.open(train.samples[0][1]).mode == "P"
    assert np.array_equal(label, stored) and (label[0] == 255).all() and label.max(initial=0) == 255
    with pytest.raises(DataError, match="train_aug.txt is missing.*prepare_voc_aug"):
        PascalVOC(voc, "train_aug")


def test_ade20k_shifts_labels_and_ignores_other(tmp_path):
    root = write_ade20k(tmp_path)
    train, val = ADE20K(root, "train"), ADE20K(root, "val")
    assert (len(train), len(val)) == (3, 2) and len(ADE20K.class_names) == 150
    raw = np.asarray(Image.open(train.samples[0][1]))
    label = train.load(0)[1]
    assert (label[raw == 0] == 255).all() and (label[raw == 1] == 0).all() and (label[raw == 150] == 149).all()


def test_deepglobe_colours_threshold_and_unknown(tmp_path):
    root = write_deepglobe(tmp_path, n=6)
    dataset = DeepGlobeLand(root, "val", fold=0)  # 6 images: fold 0 validates on all of them
    assert len(dataset) == 6
    with pytest.raises(DataError, match="holds no images"):  # fold 0 trains on images 160 and later: none here
        DeepGlobeLand(root, "train", fold=0)
    _, label = dataset.load(0)
    for col in range(7):
        expected = 255 if DEEPGLOBE_COLOURS[col % 7] == (0, 0, 0) else col % 7
        assert (label[:, col] == expected).all(), col


def test_deepglobe_folds_on_803_names():
    names = [f"{i:06d}_sat.jpg" for i in np.random.default_rng(0).permutation(1000)[:803]]
    ordered = sorted(names)
    vals = []
    for fold in range(5):
        train, val = fold_split(names, fold, "train"), fold_split(names, fold, "val")
        assert (len(train), len(val)) == (643, 160)
        assert not set(train) & set(val) and set(train) | set(val) == set(names)
        assert val == ordered[160 * fold : 160 * (fold + 1)]
        vals += val
    assert len(set(vals)) == 800  # the folds' validation sets are disjoint
    with pytest.raises(DataError, match="fold"):
        fold_split(names, 5, "val")


# --- pipelines ---------------------------------------------------------------------------------------------------
def test_train_pipeline_keeps_label_values_and_alignment():
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 5, (6, 8)), np.ones((12, 12), dtype=np.int64)).astype(np.uint8)
    label[:5, :5] = 255
    image = np.repeat((label.astype(int) * 40 % 256)[..., None], 3, axis=-1).astype(np.uint8)
    t = train_transform((64, 64), (0.5, 2.0))
    for seed in range(20):
        import random

        random.seed(seed)
        np.random.seed(seed)
        out = t(image=image, mask=label)
        img, lab = out["image"], out["mask"]
        assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
        assert img.dtype == lab.dtype == np.uint8  # normalised on the device, not in the worker
        assert set(np.unique(lab)) <= set(np.unique(label)) | {255}
        restored = img[..., 0].astype(float)
        interior = ~boundary_map(torch.from_numpy(lab.astype(np.int64)), 5, None).numpy() & (lab != 255)
        interior[:2] = interior[-2:] = interior[:, :2] = interior[:, -2:] = False  # neighbours beyond the crop unseen
        assert np.allclose(restored[interior], (lab[interior].astype(int) * 40 % 256), atol=1.0)


def whole_image_pipeline(crop, scale_range, mean=IMAGENET_MEAN):
    """albumentations' own transforms: rescale the whole image, pad (centred), crop."""
    lo, hi = scale_range
    return A.Compose(
        [
            A.RandomScale(
                scale_limit=(lo - 1, hi - 1),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),
            A.PadIfNeeded(
                min_height=crop[0], min_width=crop[1], border_mode=cv2.BORDER_CONSTANT, fill=mean, fill_mask=255
            ),
            A.RandomCrop(height=crop[0], width=crop[1]),
        ]
    )


def test_scale_and_crop_of_the_region_only_equal_albumentations_rescaling_the_whole_image():
    """Same generator state -> the same scale and crop as RandomScale + PadIfNeeded + RandomCrop (so the same
    augmentation distribution); the label to the pixel, the image within one grey level (warpAffine's 1/32-pixel
    interpolation against cv2.resize's), over image sizes that need padding, cropping or both."""
    rng = np.random.default_rng(0)
    worst, shapes = 0, set()
    for trial in range(60):
        rows, cols = (int(v) for v in rng.integers(20, 300, 2))
        crop = tuple(int(v) for v in rng.integers(16, 200, 2))
        smooth = cv2.resize(rng.integers(0, 256, (rows // 8 + 2, cols // 8 + 2, 3), dtype=np.uint8), (cols, rows))
        image = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8) if trial % 3 == 0 else smooth  # noise too
        label = rng.integers(0, 20, (rows, cols), dtype=np.uint8)
        ours = A.Compose([RandomScaleCrop(*crop, (0.5, 2.0), IMAGENET_MEAN, 255)])
        reference = whole_image_pipeline(crop, (0.5, 2.0))
        outputs = []
        for pipeline in (ours, reference):
            seed = 1000 + trial
            pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
            outputs.append(pipeline(image=image, mask=label))
        (a, b) = outputs
        assert a["image"].shape == b["image"].shape == (*crop, 3) and a["image"].dtype == np.uint8
        assert np.array_equal(a["mask"], b["mask"]), trial
        worst = max(worst, int(np.abs(a["image"].astype(int) - b["image"].astype(int)).max()))
        shapes.add((rows * 2 > crop[0], rows // 2 < crop[0]))
    assert worst <= 1
    assert len(shapes) >= 3  # crops inside the image, padded ones and mixed ones were all drawn


def test_batch_to_device_normalises_uint8_images_and_widens_labels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 5, 7), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 255, (2, 5, 7), generator=g, dtype=torch.uint8)
    expected = (images.double() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    for channels_last in (False, True):
        x, y = BatchToDevice("cpu", IMAGENET_MEAN, IMAGENET_STD, channels_last)(images, labels)
        assert x.dtype == torch.float32 and torch.allclose(x.double(), expected, atol=1e-6)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert y.dtype == torch.int64 and torch.equal(y, labels.long())
    with pytest.raises(DataError, match="float32 images; segjml's data sets give uint8 images"):
        BatchToDevice("cpu").images(images.float())


# --- bad input ------------------------------------------------------------------------------------------------------
def test_missing_root_and_split_name_the_directory(tmp_path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist"):
        Cityscapes(tmp_path / "nope", "train")
    root = write_cityscapes(tmp_path / "cs", sizes=(("train", 1),))
    with pytest.raises(DataError, match="leftImg8bit/val is missing"):
        Cityscapes(root, "val")


def test_corrupt_image_value_and_size_mismatch_name_the_file(tmp_path):
    voc, _ = write_voc(tmp_path)
    dataset = PascalVOC(voc, "train")
    image_path, label_path = dataset.samples[0]
    image_path.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=f"cannot read image {image_path}"):
        dataset.load(0)
    image2, label2 = dataset.samples[1]
    bad = np.asarray(Image.open(label2)).copy()
    bad[3, 3] = 50
    Image.fromarray(bad, mode="L").save(label2)
    with pytest.raises(DataError, match=f"label {label2} holds value 50"):
        dataset.load(1)
    val = PascalVOC(voc, "val")
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8), mode="L").save(val.samples[0][1])
    with pytest.raises(DataError, match="is 32x24 but its label .* is 5x5"):
        val.load(0)


def test_bad_deepglobe_colour_names_the_file(tmp_path):
    root = write_deepglobe(tmp_path, n=1)
    dataset = DeepGlobeLand(root, "val")
    mask = np.zeros((16, 21, 3), dtype=np.uint8)
    mask[2, 3] = (255, 0, 0)
    Image.fromarray(mask).save(dataset.samples[0][1])
    with pytest.raises(DataError, match=r"holds colour \(255, 0, 0\) at \(3, 2\)"):
        dataset.load(0)


def test_validate_cli_lists_every_bad_file(tmp_path):
    root = write_ade20k(tmp_path / "ade20k")
    images = sorted((root / "ADEChallengeData2016" / "images" / "training").glob("*.jpg"))
    images[1].write_bytes(b"broken")
    logs = f"paths.log_dir={tmp_path / 'logs'}"  # the data report goes there, not into the checkout
    cmd = [sys.executable, "-m", "segjml.data.validate", "dataset=ade20k", logs, f"paths.data_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"bad: cannot read image {images[1]}" in proc.stdout
    assert "5 samples scanned, 1 bad" in proc.stdout
    missing = subprocess.run(
        [*cmd[:-1], f"paths.data_dir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --- preparation scripts ---------------------------------------------------------------------------------------------
def run_script(name, *args):
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_prepare_voc_aug_from_sbd_mat(tmp_path):
    voc, sbd = write_voc(tmp_path)
    proc = run_script("prepare_voc_aug.py", "--voc-root", str(voc), "--sbd-root", str(sbd), "--expected-count", "3")
    assert proc.returncode == 0, proc.stderr
    names = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert names == ["2007_000032", "2007_000039", "2008_000002"]  # the VOC val image 2007_000033 is excluded
    import scipy.io

    mat = scipy.io.loadmat(sbd / "cls" / "2008_000002.mat", squeeze_me=True, struct_as_record=False)
    dataset = PascalVOC(voc, "train_aug")
    assert len(dataset) == 3
    assert np.array_equal(dataset.load(2)[1], mat["GTcls"].Segmentation)
    again = run_script("prepare_voc_aug.py", "--voc-root", str(voc), "--sbd-root", str(sbd), "--expected-count", "4")
    assert again.returncode == 1 and "found 3, expected 4" in again.stderr  # idempotent rerun, count checked


def test_prepare_cityscapes_and_deepglobe(tmp_path):
    cs = write_cityscapes(tmp_path / "cs")
    mapped = [Cityscapes(cs, "train").load(i)[1] for i in range(3)]
    proc = run_script("prepare_cityscapes.py", "--root", str(cs), "--no-count-check")
    assert proc.returncode == 0, proc.stderr
    dataset = Cityscapes(cs, "train")
    assert all(p.name.endswith("_labelTrainIds.png") for _, p in dataset.samples)
    assert all(np.array_equal(dataset.load(i)[1], mapped[i]) for i in range(3))
    assert run_script("prepare_cityscapes.py", "--root", str(cs)).returncode == 1  # 3 != 2975
    dg = write_deepglobe(tmp_path / "dg", n=2)
    before = DeepGlobeLand(dg, "val").load(0)[1]
    assert run_script("prepare_deepglobe.py", "--root", str(dg), "--no-count-check").returncode == 0
    dataset = DeepGlobeLand(dg, "val")
    assert dataset.samples[0][1].name.endswith("_label.png") and np.array_equal(dataset.load(0)[1], before)


@pytest.mark.parametrize("name", ["cityscapes", "voc", "ade20k", "deepglobe_land"])
def test_train_runs_on_each_fixture(name, tmp_path):
    data = tmp_path / "data"
    if name == "cityscapes":
        write_cityscapes(data / "cityscapes")
    elif name == "voc":
        voc, sbd = write_voc(data)
        assert (
            run_script(
                "prepare_voc_aug.py", "--voc-root", str(voc), "--sbd-root", str(sbd), "--expected-count", "3"
            ).returncode
            == 0
        )
    elif name == "ade20k":
        write_ade20k(data / "ade20k")
    else:
        write_deepglobe(data / "deepglobe", n=6)
    overrides = [
        f"dataset={name}",
        f"paths.data_dir={data}",
        "trainer.max_iters=2",
        "trainer.batch_size=2",
        "dataset.crop_size=[64,64]",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "pretrained=false",  # the data set's recipe asks for ImageNet weights, which tests cannot download
        "logger=none",
    ]
    if name == "deepglobe_land":
        # with 6 images fold 0 leaves no training image: train on fold 0's validation images instead
        overrides += ["dataset.fold=0", "dataset.train.split=val"]
    run_in_process("train.py", overrides, tmp_path / "out")  # train.py as a process: test_train_on_a_broken_root...
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["class_names"]) == {"cityscapes": 19, "voc": 21, "ade20k": 150, "deepglobe_land": 6}[name]
    assert 0 <= metrics["miou"] <= 100 and (tmp_path / "out" / "checkpoints" / "last.pt").is_file()


def test_a_training_split_smaller_than_a_batch_fills_its_batches_with_copies(tmp_path, caplog):
    """3 samples, batch 8: an epoch is 3 copies (9 keys, one batch, the ninth dropped); each key is augmented by
    itself, so the copies of a sample differ."""
    from segjml.data import build_dataset, build_loader

    cfg = compose_config(["dataset=cityscapes", f"paths.data_dir={tmp_path}", "dataset.crop_size=[32,32]"])
    write_cityscapes(tmp_path / "cityscapes", sizes=(("train", 3),))
    dataset = build_dataset(cfg.dataset, "train")
    with caplog.at_level("INFO", logger="segjml.data.loader"):
        loader = build_loader(dataset, 8, True, num_workers=0, seed=5)
    assert "has 3 samples, fewer than one batch (trainer.batch_size=8 x 1 process(es))" in caplog.text
    assert "every sample 3 times" in caplog.text
    keys = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        keys.append(list(loader.sampler))
    assert [sorted(k % 3 for k in epoch) for epoch in keys] == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    assert [sorted(epoch) for epoch in keys] == [list(range(9)), list(range(9, 18))]
    loader.sampler.set_epoch(0)
    (images, labels), *rest = list(loader)
    assert not rest and images.shape == (8, 3, 32, 32)
    copies = [i for i, key in enumerate(keys[0][:8]) if key % 3 == keys[0][0] % 3]
    assert len(copies) >= 2 and not torch.equal(images[copies[0]], images[copies[1]])


def test_a_training_split_left_empty_by_limit_train_samples_is_refused_in_one_line(tmp_path):
    from torch.utils.data import Subset

    from segjml.data import build_loader

    dataset = Cityscapes(write_cityscapes(tmp_path / "cs", sizes=(("train", 3),)), "train")
    with pytest.raises(DataError) as err:
        build_loader(Subset(dataset, range(0)), 2, True)
    assert str(err.value) == (
        "the training split holds no sample; set trainer.limit_train_samples to 1 or more (null: all)"
    )


def test_train_on_a_broken_root_stops_with_one_line(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "dataset=cityscapes",
        f"paths.data_dir={tmp_path}",
        "trainer.max_iters=2",
        f"paths.log_dir={tmp_path / 'out'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data root {tmp_path / 'cityscapes'} does not exist")
    assert "Traceback" not in proc.stderr
