"""The data report of ``python -m segjml.data.validate`` (segjml/data/report.py), on folder data sets the tests write.

Every number is computed here again from the files, with numpy alone: pixels and images per class from the mask PNGs,
the boundary share by a plain k x k window check, the mean and std over the decoded training images, the matched eps
by the rule of docs/losses.md and the class weights by median frequency balancing. The commands of docs/datasets.md's
section "The data report" run as typed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segjml.data.report import REFERENCE_SHARE, SplitStats, matched_eps, median_frequency_weights
from segjml.data.synthetic import make_sample
from segjml.data.validate import main as validate
from tests.helpers import ROOT
from tests.test_folder_dataset import CLASSES, write_folder

IGNORE = 255


def add_odd_sample(root: Path, seed: int = 5) -> None:
    """One more training pair of another size, of classes 0 and 1 only (so that the classes are in different images),
    with an ignored stripe across their border (where the two ignore rules of BLS differ)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 56), dtype=np.uint8)
    label[:12, 20:] = 1
    label[:, 30] = IGNORE
    Image.fromarray(rng.integers(0, 256, (24, 56, 3), dtype=np.uint8)).save(root / "images/train/train_99.jpg")
    Image.fromarray(label, mode="L").save(root / "masks/train/train_99.png")


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "mine"
    write_folder(root, seed=3)
    add_odd_sample(root)
    return root


def masks(root: Path, split: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / "masks" / split).glob("*.png"))]


def numpy_boundary(label: np.ndarray, k: int, strict: bool) -> np.ndarray:
    """Boundary pixels by the definition (docs/losses.md): a kept pixel whose k x k window holds a kept pixel of another
    class; with ``strict``, also no ignored pixel in the window. Outside the image is neither."""
    r, (h, w) = k // 2, label.shape
    padded = np.full((h + 2 * r, w + 2 * r), -1, dtype=np.int64)
    padded[r : r + h, r : r + w] = label
    other = np.zeros((h, w), dtype=bool)
    near_ignore = np.zeros((h, w), dtype=bool)
    for dy in range(k):
        for dx in range(k):
            nb = padded[dy : dy + h, dx : dx + w]
            other |= (nb >= 0) & (nb != IGNORE) & (nb != label)
            near_ignore |= nb == IGNORE
    boundary = (label != IGNORE) & other
    return boundary & ~near_ignore if strict else boundary


def boundary_share(labels: list[np.ndarray], k: int, strict: bool) -> float:
    return sum(int(numpy_boundary(x, k, strict).sum()) for x in labels) / sum(int((x != IGNORE).sum()) for x in labels)


def run_report(capsys, root: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    code = validate(["dataset=folder", f"dataset.root={root}", "dataset.classes=[a,b,c]", f"report_dir={out}", *extra])
    report = json.loads((out / "data_report.json").read_text())
    return code, report, capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides,k,strict,eps",
    [
        ([], 3, True, None),  # the default loss has no BLS: the k and rule of loss/bls/default.yaml
        (["loss=ce_jml_bls"], 3, True, 0.5),
        (
            ["loss=ce_jml_bls", "loss.bls.kernel_size=5", "loss.bls.strict_ignore=false", "loss.bls.eps=0.2"],
            5,
            False,
            0.2,
        ),
    ],
)
def test_the_boundary_share_is_what_bls_smooths_at_the_configured_kernel(
    folder, tmp_path, capsys, overrides, k, strict, eps
):
    code, report, out = run_report(capsys, folder, tmp_path / "report", *overrides)
    assert code == 0
    bls = report["bls"]
    assert (bls["kernel_size"], bls["strict_ignore"], bls["configured_eps"]) == (k, strict, eps)
    assert bls["from"] == ("loss.bls" if overrides else "loss/bls/default.yaml")
    for split in ("train", "val"):
        want = boundary_share(masks(folder, split), k, strict)
        assert report["splits"][split]["boundary_share"] == pytest.approx(want, rel=1e-12)
    share = boundary_share(masks(folder, "train"), k, strict)
    assert share != pytest.approx(boundary_share(masks(folder, "train"), k, not strict))  # the rule is passed on
    assert bls["boundary_share"] == pytest.approx(share, rel=1e-12)
    assert bls["reference_share"] == REFERENCE_SHARE
    assert bls["matched_eps"] == pytest.approx(0.5 * REFERENCE_SHARE / share, rel=1e-12)
    assert f"loss.bls.eps={0.5 * REFERENCE_SHARE / share:.3f}" in out
    assert "our reading, not the paper's" in bls["rule"] and "our reading, not the paper's" in out


def test_pixels_images_values_and_sizes_per_split_match_the_masks(folder, tmp_path, capsys):
    code, report, out = run_report(capsys, folder, tmp_path / "report")
    assert code == 0
    assert report["dataset"] == "folder" and report["class_names"] == CLASSES and report["num_classes"] == 3
    for split in ("train", "val"):
        labels, got = masks(folder, split), report["splits"][split]
        pixels = [int(sum((x == c).sum() for x in labels)) for c in range(3)]
        assert got["images"] == len(labels)
        assert got["class_pixels"] == pixels
        assert got["class_images"] == [sum(bool((x == c).any()) for x in labels) for c in range(3)]
        assert got["labelled_pixels"] == sum(pixels)
        assert got["ignored_pixels"] == sum(int((x == IGNORE).sum()) for x in labels)
        assert got["class_frequency"] == pytest.approx([p / sum(pixels) for p in pixels], rel=1e-12)
        assert got["label_values"] == sorted(set(np.concatenate([np.unique(x) for x in labels]).tolist()))
        for axis, name in enumerate(("height", "width")):
            sizes = [x.shape[axis] for x in labels]
            assert got["image_size"][name] == {"min": min(sizes), "median": np.median(sizes), "max": max(sizes)}
    assert report["splits"]["train"]["image_size"]["height"] == {"min": 24, "median": 32, "max": 32}
    assert report["splits"]["train"]["class_images"][2] == report["splits"]["train"]["images"] - 1  # not in the odd one
    for name in CLASSES:
        assert re.search(rf"^{name}\s+[\d,]+\s+[\d.]+%", out, re.M), name


def test_mean_and_std_are_those_of_the_training_images_and_print_as_overrides(folder, tmp_path, capsys):
    _, report, out = run_report(capsys, folder, tmp_path / "report")
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((folder / "images/train").glob("*"))]
    pixels = np.concatenate([x.reshape(-1, 3) for x in images]).astype(np.float64)
    norm = report["normalisation"]
    assert norm["mean"] == pytest.approx(pixels.mean(axis=0).tolist(), rel=1e-12)
    assert norm["std"] == pytest.approx(pixels.std(axis=0).tolist(), rel=1e-9)
    assert (norm["split"], norm["scale"]) == ("train", "0-255")
    mean = ",".join(f"{v:.2f}" for v in pixels.mean(axis=0))
    assert f"dataset.mean=[{mean}]" in out and "dataset.std=[" in out


def test_class_weights_are_median_frequency_balancing_rescaled_to_mean_one(folder, tmp_path, capsys):
    _, report, out = run_report(capsys, folder, tmp_path / "report")
    labels = masks(folder, "train")
    freq = []
    for c in range(3):
        holding = [x for x in labels if (x == c).any()]
        freq.append(sum(int((x == c).sum()) for x in holding) / sum(int((x != IGNORE).sum()) for x in holding))
    raw = np.median(freq) / np.asarray(freq)
    want = raw / raw.mean()
    weights = report["class_weights"]
    assert weights["formula"] == "median frequency balancing"
    assert weights["weights"] == pytest.approx(want.tolist(), rel=1e-12)
    assert not np.allclose(want, 1.0)  # the odd sample unbalances the classes: a test that can fail
    assert "loss.jml.class_weights=[" + ",".join(f"{w:.3f}" for w in want) + "]" in out


def test_weights_and_eps_at_the_edges():
    # class 0 absent: weight 1; f = (100/1000, 300/600) = (0.1, 0.5), median 0.3 -> (3, 0.6) / 1.8
    assert median_frequency_weights(np.array([0, 100, 300]), np.array([0, 1000, 600])) == pytest.approx(
        [1.0, 5 / 3, 1 / 3]
    )
    assert median_frequency_weights(np.zeros(3), np.zeros(3)) == [1.0, 1.0, 1.0]
    assert matched_eps(0.1, 0.02) == pytest.approx(0.1)
    assert matched_eps(0.004, 0.02) == 1.0  # capped: eps is at most 1
    assert matched_eps(0.0) is None and matched_eps(None) is None


def test_the_reference_share_option_and_the_cap(folder, tmp_path, capsys):
    share = boundary_share(masks(folder, "train"), 3, True)
    _, report, _ = run_report(capsys, folder, tmp_path / "a", "reference_share=0.05")
    assert report["bls"]["reference_share"] == 0.05
    assert report["bls"]["matched_eps"] == pytest.approx(0.5 * 0.05 / share, rel=1e-12)
    assert report["bls"]["reference_source"] == "given as reference_share="
    _, report, _ = run_report(capsys, folder, tmp_path / "b", "reference_share=1")
    assert 0.5 / share > 1 and report["bls"]["matched_eps"] == 1.0


def test_limit_reads_the_first_samples_of_each_split(folder, tmp_path, capsys):
    code, report, out = run_report(capsys, folder, tmp_path / "report", "limit=3")
    assert code == 0 and report["limit"] == 3
    assert report["splits"]["train"]["images"] == report["splits"]["val"]["images"] == 3
    assert report["splits"]["train"]["class_pixels"] == [
        int(sum((x == c).sum() for x in masks(folder, "train")[:3])) for c in range(3)
    ]
    assert "folder: 6 samples scanned, 0 bad" in out


@pytest.mark.parametrize("option,message", [("limit=0", "limit=0 must be"), ("reference_share=2", "reference_share=2")])
def test_a_bad_option_stops_with_one_line(folder, tmp_path, capsys, option, message):
    code = validate(["dataset=folder", f"dataset.root={folder}", "dataset.classes=[a,b,c]", option])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")


def test_a_bad_file_is_listed_and_left_out_of_the_report(folder, tmp_path, capsys):
    broken = folder / "images/val/val_01.jpg"
    broken.write_bytes(b"broken")
    code, report, out = run_report(capsys, folder, tmp_path / "report")
    assert code == 1
    assert f"bad: cannot read image {broken}" in out
    kept = [x for i, x in enumerate(masks(folder, "val")) if i != 1]
    assert report["splits"]["val"]["images"] == 3
    assert report["splits"]["val"]["class_pixels"] == [int(sum((x == c).sum() for x in kept)) for c in range(3)]


def test_a_generated_data_set_is_reported_from_its_samples(tmp_path, capsys):
    code = validate(["dataset=synthetic", "limit=4", f"report_dir={tmp_path}"])
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert code == 0 and "generated data set" in capsys.readouterr().out
    labels = [make_sample(0, "val", i, 64)[1] for i in range(4)]
    assert report["splits"]["val"]["class_pixels"] == [int(sum((x == c).sum() for x in labels)) for c in range(6)]
    assert report["splits"]["val"]["boundary_share"] == pytest.approx(boundary_share(labels, 3, True), rel=1e-12)


def test_the_reference_share_is_the_synthetic_sets_at_512():
    """REFERENCE_SHARE is the measurement docs/benchmarks.md reports: 50 validation images of the synthetic set at
    512x512, k = 3 (it has no ignored pixels, so either ignore rule)."""
    stats = SplitStats(6, IGNORE, 3, strict_ignore=True)
    for i in range(50):
        stats.add(*make_sample(0, "val", i, 512))
    assert stats.boundary_share() == pytest.approx(REFERENCE_SHARE, abs=5e-6)
    assert "1.26%" in (ROOT / "docs" / "benchmarks.md").read_text()


def test_the_chart_is_a_png_with_a_bar_per_class_and_split(folder, tmp_path, capsys):
    run_report(capsys, folder, tmp_path / "report")
    path = tmp_path / "report" / "class_frequencies.png"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 200
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 2  # not a blank image


# --- the commands of docs/datasets.md, "The data report" -----------------------------------------------------------


def section_commands() -> tuple[str, list[str]]:
    text = (ROOT / "docs" / "datasets.md").read_text()
    section = text.split("## The data report", 1)[1].split("\n## ", 1)[0]
    return section, re.findall(r"^\s*(python .*?)(?:\s+#.*)?$", section, re.M)


def test_the_documented_report_command_writes_what_the_text_says(tmp_path):
    section, commands = section_commands()
    assert commands
    write_folder(tmp_path / "mine", seed=4)
    for i, command in enumerate(commands):
        log_dir = tmp_path / f"out{i}"
        args = [arg.replace("/data/", f"{tmp_path}/") for arg in shlex.split(command)]
        proc = subprocess.run(
            [sys.executable, *args[1:], f"paths.log_dir={log_dir}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # "<paths.log_dir>/data_report/<dataset.name>_<date>_<time>/"
        (json_path,) = log_dir.glob("data_report/folder_*/data_report.json")
        assert (json_path.parent / "class_frequencies.png").is_file()
        assert f"data report: {json_path}" in proc.stdout
        report = json.loads(json_path.read_text())
        rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
        keys = [key for cell in rows for key in re.findall(r"`([^`]+)`", cell)]  # the documented table's keys
        assert len(keys) >= 15
        for split in ("train", "val"):
            for key in keys:
                node = report
                for part in key.replace("<split>", split).split("."):
                    assert part in node, key
                    node = node[part]
        assert report["bls"]["from"] == "loss.bls" and report["bls"]["kernel_size"] == 3
        for pasted in ("dataset.mean=[", "dataset.std=[", "loss.bls.eps=", "loss.jml.class_weights=["):
            assert pasted in proc.stdout, pasted
