"""Segmentation metrics against torchmetrics and a plain NumPy computation of the definitions."""

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassJaccardIndex

from segjml.labels import boundary_map
from segjml.metrics import SegmentationMetrics
from tests.distributed import run_on_ranks

C = 5


def random_batch(seed, b=3, h=24, w=20, ignore=True, c=C):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(b, c, h, w, generator=g) * 2).softmax(1)
    # labels agree with the argmax most of the time, so the metrics are not all near chance
    target = torch.where(torch.rand(b, h, w, generator=g) < 0.6, probs.argmax(1), torch.randint(0, c, (b, h, w),
                                                                                               generator=g))
    target.view(b, -1)[:, :c] = torch.arange(c)  # every class occurs
    if ignore:
        target[:, 5:9, 3:11] = 255
    return probs, target


@pytest.mark.parametrize("ignore", [False, True])
def test_acc_miou_ece_equal_torchmetrics(ignore):
    probs, target = random_batch(0, ignore=ignore)
    m = SegmentationMetrics(C, n_bins=10)
    m.update(probs, target)
    r = m.compute()
    keep = target != 255
    p = probs.permute(0, 2, 3, 1)[keep]
    t = target[keep]
    assert r["acc"] == pytest.approx(100 * float(MulticlassAccuracy(C, average="micro")(p, t)), abs=1e-5)
    assert r["miou"] == pytest.approx(100 * float(MulticlassJaccardIndex(C)(p, t)), abs=1e-5)
    ece = MulticlassCalibrationError(C, n_bins=10, norm="l1")(p, t)
    assert r["ece"] == pytest.approx(100 * float(ece), abs=1e-4)


def numpy_reference(probs, target, n_bins=10, k=3):
    """The definitions of REFERENCE.md section 3, written out with NumPy loops over classes and images."""
    probs, target = probs.double().numpy(), target.numpy()
    bnd = boundary_map(torch.as_tensor(target), k).numpy()
    keep = target != 255
    out = {}

    def ece(mask):
        conf = probs.max(1)[mask]
        correct = (probs.argmax(1) == target)[mask]
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        return sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(n_bins)) / mask.sum()

    def sce(mask):
        total = 0.0
        for c in range(probs.shape[1]):
            pc = probs[:, c][mask]
            yc = (target[mask] == c)
            bins = np.minimum((pc * n_bins).astype(int), n_bins - 1)
            total += sum(abs(yc[bins == b].sum() - pc[bins == b].sum()) for b in range(n_bins)) / mask.sum()
        return total / probs.shape[1]

    out["ece"], out["bece"], out["sce"], out["bsce"] = ece(keep), ece(bnd), sce(keep), sce(bnd)
    pred = probs.argmax(1)
    image_means, per_class = [], {c: [] for c in range(probs.shape[1])}
    for b in range(probs.shape[0]):
        ious = []
        for c in range(probs.shape[1]):
            gt, pr = (target[b] == c) & keep[b], (pred[b] == c) & keep[b]
            union = (gt | pr).sum()
            if union:
                ious.append((gt & pr).sum() / union)
                per_class[c].append(ious[-1])
        image_means.append(np.mean(ious))
    out["miou_i"] = np.mean(image_means)
    out["miou_c"] = np.mean([np.mean(v) for v in per_class.values() if v])
    return {k: 100 * v for k, v in out.items()}


@pytest.mark.parametrize("seed", [1, 2])
def test_fine_grained_iou_and_calibration_equal_numpy(seed):
    probs, target = random_batch(seed)
    m = SegmentationMetrics(C, n_bins=10, boundary_kernel=3)
    m.update(probs, target)
    r = m.compute()
    ref = numpy_reference(probs, target)
    for key in ("sce", "bece", "bsce", "miou_i", "miou_c", "ece"):
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key


def test_sce_with_many_classes_equals_numpy():
    # C > n_bins: many classes stay in the first bin everywhere, which the metric derives from totals.
    probs, target = random_batch(3, b=2, h=12, w=12, c=23)
    m = SegmentationMetrics(23, n_bins=10)
    m.update(probs, target)
    ref = numpy_reference(probs, target)
    assert m.compute()["sce"] == pytest.approx(ref["sce"], abs=1e-6)


def test_many_classes_sparse_path_and_low_confidence_pixels():
    # C = 64 takes the sparse search for p >= 1 / n_bins; near-uniform pixels have no class above 1 / n_bins,
    # so their prediction comes from the direct argmax fallback.
    probs, target = random_batch(7, b=2, h=10, w=14, c=64)
    flat = torch.randn(2, 64, 10, 14).mul(0.05).softmax(1)
    probs[:, :, :5] = flat[:, :, :5]
    m = SegmentationMetrics(64, n_bins=10)
    m.update(probs, target)
    r = m.compute()
    ref = numpy_reference(probs, target)
    for key in ("sce", "bsce", "ece", "bece", "miou_i", "miou_c"):
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key
    keep = target != 255
    p, t = probs.permute(0, 2, 3, 1)[keep], target[keep]
    assert r["miou"] == pytest.approx(100 * float(MulticlassJaccardIndex(64)(p, t)), abs=1e-5)


def test_streaming_equals_one_big_update():
    probs, target = random_batch(4, b=6)
    one, many = SegmentationMetrics(C), SegmentationMetrics(C)
    one.update(probs, target)
    for i in range(6):
        many.update(probs[i:i + 1], target[i:i + 1])
    a, b = one.compute(), many.compute()
    for key in a:
        assert np.allclose(a[key], b[key], equal_nan=True), key


def test_bad_inputs_raise_value_errors():
    m = SegmentationMetrics(C)
    probs, target = random_batch(5)
    with pytest.raises(ValueError, match="class id 9"):
        m.update(probs, torch.full_like(target, 9))
    with pytest.raises(ValueError, match="not a distribution"):
        m.update(probs * 2, target)
    with pytest.raises(ValueError, match="not a distribution"):
        m.update(torch.randn_like(probs), target)
    with pytest.raises(ValueError, match="does not match"):
        m.update(probs, target[:, :5])


def _metrics_on_rank(rank, world):
    probs, target = random_batch(6, b=4)
    m = SegmentationMetrics(C)
    m.update(probs[rank * 2:(rank + 1) * 2], target[rank * 2:(rank + 1) * 2])
    return m.compute()  # synchronised over the two processes by torchmetrics


def test_ddp_two_processes_equal_one_process():
    results = run_on_ranks(_metrics_on_rank, world=2)
    probs, target = random_batch(6, b=4)
    single = SegmentationMetrics(C)
    single.update(probs, target)
    expected = single.compute()
    for result in results:
        for key in expected:
            assert np.allclose(result[key], expected[key], equal_nan=True), key
