"""Segmentation metrics against torchmetrics and a plain NumPy computation of the definitions."""

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassJaccardIndex

from segjml.labels import boundary_map
from segjml.metrics import SegmentationMetrics
from segjml.metrics import functional as mf
from tests.distributed import run_on_ranks

C = 5


def random_batch(seed, b=3, h=24, w=20, ignore=True, c=C):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(b, c, h, w, generator=g) * 2).softmax(1)
    # labels agree with the argmax most of the time, so the metrics are not all near chance
    target = torch.where(
        torch.rand(b, h, w, generator=g) < 0.6, probs.argmax(1), torch.randint(0, c, (b, h, w), generator=g)
    )
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
    """The definitions of docs/metrics.md, written out with NumPy loops over classes and images."""
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
            yc = target[mask] == c
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
        many.update(probs[i : i + 1], target[i : i + 1])
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
    m.update(probs[rank * 2 : (rank + 1) * 2], target[rank * 2 : (rank + 1) * 2])
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


# ---------------------------------------------------------------------------------------------------------------------
# The pure functions of segjml.metrics.functional against independent computations


def bins_of(values, n_bins):
    """Bin index as the metrics define it, in the values' own float precision."""
    return np.minimum(np.floor(values * np.float32(n_bins)).astype(int), n_bins - 1)


def test_confusion_matrices_equal_a_python_loop():
    g = torch.Generator().manual_seed(20)
    pred = torch.randint(0, 4, (2, 5, 7), generator=g)
    target = torch.randint(0, 4, (2, 5, 7), generator=g)
    target[0, 1:3, 2:6] = 255
    valid = target != 255
    expected = torch.zeros(2, 4, 4, dtype=torch.long)
    for b in range(2):
        for i in range(5):
            for j in range(7):
                if valid[b, i, j]:
                    expected[b, target[b, i, j], pred[b, i, j]] += 1
    per_image = mf.image_confusion_matrices(pred, target, 4, valid)
    assert per_image.dtype == torch.long and torch.equal(per_image, expected)
    assert torch.equal(mf.confusion_matrix(pred, target, 4, valid), expected.sum(0))
    assert torch.equal(mf.confusion_matrix(pred[1], target[1], 4), expected[1])  # no ignored pixel in image 1


def test_iou_accuracy_and_mean_iou_from_a_confusion_matrix():
    g = torch.Generator().manual_seed(21)
    cm = torch.randint(0, 6, (6, 6), generator=g)
    cm[2, :], cm[:, 2] = 0, 0  # class 2 never occurs
    cm[4, 4] = 0  # class 4 occurs but is never right: IoU 0
    expected = []
    for k in range(6):
        inter, union = int(cm[k, k]), int(cm[k, :].sum() + cm[:, k].sum() - cm[k, k])
        expected.append(inter / union if union else float("nan"))
    iou = mf.iou_from_confusion(cm)
    assert iou.dtype == torch.float64
    np.testing.assert_allclose(iou.numpy(), expected, rtol=0, atol=1e-15)
    assert iou[4] == 0 and torch.isnan(iou[2])
    assert float(mf.mean_iou(iou)) == pytest.approx(np.nanmean(expected), abs=1e-15)
    assert float(mf.pixel_accuracy(cm)) == pytest.approx(int(cm.trace()) / int(cm.sum()), abs=1e-15)
    empty = torch.zeros(3, 3, dtype=torch.long)
    assert float(mf.mean_iou(mf.iou_from_confusion(empty))) == 0 and float(mf.pixel_accuracy(empty)) == 0


def test_image_iou_statistics_equal_a_python_loop():
    g = torch.Generator().manual_seed(22)
    b, c = 4, 6
    pred = torch.randint(0, c, (b, 6, 6), generator=g)
    target = torch.randint(0, c - 2, (b, 6, 6), generator=g)  # classes 4, 5 only ever predicted
    target[1, :3] = 255
    target[3] = 255  # an image without counted pixels adds nothing
    valid = target != 255
    image_means, per_class = [], {k: [] for k in range(c)}
    for i in range(b):
        ious = {}
        for k in range(c):  # a class occurs in an image when it is in its ground truth or its prediction
            gt, pr = (target[i] == k) & valid[i], (pred[i] == k) & valid[i]
            union = int((gt | pr).sum())
            if union:
                ious[k] = int((gt & pr).sum()) / union
                per_class[k].append(ious[k])
        if ious:
            image_means.append(sum(ious.values()) / len(ious))
    stats = mf.image_iou_statistics(mf.image_confusion_matrices(pred, target, c, valid))
    assert int(stats.image_count) == len(image_means) == 3
    assert float(stats.image_iou_sum) == pytest.approx(sum(image_means), abs=1e-12)
    np.testing.assert_allclose(stats.class_iou_sum.numpy(), [sum(per_class[k]) for k in range(c)], atol=1e-12)
    assert stats.class_image_count.tolist() == [len(per_class[k]) for k in range(c)]
    miou_i = mf.image_mean_iou(stats.image_iou_sum, stats.image_count)
    miou_c = mf.class_mean_iou(stats.class_iou_sum, stats.class_image_count)
    assert float(miou_i) == pytest.approx(np.mean(image_means), abs=1e-12)
    assert float(miou_c) == pytest.approx(np.mean([np.mean(v) for v in per_class.values() if v]), abs=1e-12)


def test_calibration_histogram_and_ece_equal_numpy():
    g = torch.Generator().manual_seed(23)
    n, nb = 700, 10
    conf = torch.rand(n, generator=g)
    conf[:20] = torch.arange(20) / 19  # bin edges, 0 and 1 included
    correct = torch.rand(n, generator=g) < conf
    group = torch.randint(0, 3, (n,), generator=g)  # group 2 is left out with num_groups=2
    hist = mf.calibration_histogram(conf, correct, nb, group, num_groups=2)
    assert hist.shape == (2, nb, 3) and hist.dtype == torch.float64
    c_np, y_np, g_np = conf.numpy(), correct.numpy(), group.numpy()
    bins = bins_of(c_np, nb)
    for grp in range(2):
        for b in range(nb):
            sel = (g_np == grp) & (bins == b)
            assert hist[grp, b, 0] == sel.sum()
            assert float(hist[grp, b, 1]) == pytest.approx(c_np[sel].astype(np.float64).sum(), abs=1e-12)
            assert hist[grp, b, 2] == y_np[sel].sum()
        # ECE = sum_b (n_b / N) |acc_b - conf_b| over the non-empty bins
        sel = g_np == grp
        conf_g, correct_g, bins_g = c_np[sel].astype(np.float64), y_np[sel], bins[sel]
        ece = sum(
            (bins_g == b).sum() / sel.sum() * abs(correct_g[bins_g == b].mean() - conf_g[bins_g == b].mean())
            for b in range(nb)
            if (bins_g == b).any()
        )
        assert float(mf.expected_calibration_error(hist[grp])) == pytest.approx(ece, abs=1e-12)
    whole = mf.calibration_histogram(conf, correct, nb)  # no groups: every entry, no leading dimension
    assert whole.shape == (nb, 3) and int(whole[:, 0].sum()) == n
    assert float(mf.expected_calibration_error(torch.zeros(nb, 3, dtype=torch.float64))) == 0


def test_confident_pairs_dense_and_sparse_paths_equal_nonzero():
    g = torch.Generator().manual_seed(24)
    # 5 * 0.1 <= 4: dense search; 64 * 0.1 > 4: the word scan (64 * 61 entries, not a multiple of 8)
    for c, n in ((5, 37), (64, 61)):
        probs = (torch.randn(c, n, generator=g) * 3).softmax(0)
        cls, pix, p = mf.confident_pairs(probs, 0.1)
        ref_cls, ref_pix = (probs >= 0.1).nonzero(as_tuple=True)
        assert torch.equal(cls, ref_cls) and torch.equal(pix, ref_pix) and torch.equal(p, probs[ref_cls, ref_pix])


@pytest.mark.parametrize("c", [5, 23, 64])
def test_top_label_scan_equals_argmax_and_counts_confident_pairs(c):
    probs, target = random_batch(25, b=2, h=9, w=11, c=c)
    probs[:, :, :3] = (torch.randn(2, c, 3, 11, generator=torch.Generator().manual_seed(26)) * 0.05).softmax(1)
    nb = 10
    region = mf.boundary_regions(target, 3, 255)
    scan = mf.top_label_and_confident_histogram(probs, probs.amax(1), nb, region, num_groups=2)
    assert torch.equal(scan.pred.view_as(target), probs.argmax(1))  # low-confidence pixels included (c > n_bins)
    p_np, r_np = probs.numpy(), region.numpy()
    for grp in range(2):
        for k in range(c):
            pk = p_np[:, k][(r_np == grp) & (p_np[:, k] >= np.float32(0.1))]
            bins = bins_of(pk, nb)
            for b in range(nb):
                assert scan.count[grp, k, b] == (bins == b).sum()
                assert float(scan.p_sum[grp, k, b]) == pytest.approx(pk[bins == b].astype(np.float64).sum(), abs=1e-9)


@pytest.mark.parametrize("c", [5, 23, 64])
def test_class_histogram_and_sce_equal_a_direct_loop(c):
    probs, target = random_batch(27 + c, b=2, h=10, w=9, c=c)
    nb = 10
    region = mf.boundary_regions(target, 3, 255)
    hist = mf.class_calibration_histogram(probs, target, nb, region, num_groups=2)
    assert hist.shape == (2, c, nb, 3) and hist.dtype == torch.float64
    p_np, t_np, r_np = probs.numpy(), target.numpy(), region.numpy()
    for grp in range(2):
        sel = r_np == grp
        sce = 0.0
        for k in range(c):
            pk, yk = p_np[:, k][sel], t_np[sel] == k
            bins = bins_of(pk, nb)
            for b in range(nb):
                in_bin = bins == b
                assert hist[grp, k, b, 0] == in_bin.sum()
                assert float(hist[grp, k, b, 1]) == pytest.approx(pk[in_bin].astype(np.float64).sum(), abs=1e-5)
                assert hist[grp, k, b, 2] == yk[in_bin].sum()
                if in_bin.any():
                    sce += in_bin.sum() / sel.sum() * abs(yk[in_bin].mean() - pk[in_bin].mean())
        assert float(mf.static_calibration_error(hist[grp])) == pytest.approx(sce / c, abs=1e-7)
    # reusing the scan of top_label_and_confident_histogram gives the same histogram
    scan = mf.top_label_and_confident_histogram(probs, probs.amax(1), nb, region, num_groups=2)
    again = mf.class_calibration_histogram(probs, target, nb, region, num_groups=2, confident=(scan.count, scan.p_sum))
    assert torch.equal(again, hist)


def test_boundary_regions_and_all_and_boundary():
    g = torch.Generator().manual_seed(30)
    target = torch.randint(0, 3, (2, 3, 3), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4x4 blocks
    target[:, 5:9, 2:7] = 255
    region = mf.boundary_regions(target, 3, 255)
    expected = torch.where(target == 255, 2, boundary_map(target, 3, 255).to(torch.int32))
    assert region.dtype == torch.int32 and torch.equal(region, expected)
    assert (region == mf.IGNORED).any() and (region == mf.BOUNDARY).any() and (region == mf.INTERIOR).any()
    per_region = torch.arange(12, dtype=torch.float64).view(2, 3, 2)
    both = mf.all_and_boundary(per_region)
    assert torch.equal(both[0], per_region[0] + per_region[1]) and torch.equal(both[1], per_region[1])


def test_metric_direction_is_mixed_and_state_layout_is_stable():
    m = SegmentationMetrics(7, n_bins=12)
    assert m.higher_is_better is None
    layout = {name: (tuple(getattr(m, name).shape), getattr(m, name).dtype) for name in m._defaults}
    assert layout == {
        "confmat": ((7, 7), torch.long),
        "image_iou_sum": ((), torch.float64),
        "image_count": ((), torch.long),
        "class_iou_sum": ((7,), torch.float64),
        "class_image_count": ((7,), torch.long),
        "top_hist": ((2, 12, 3), torch.float64),
        "class_hist": ((2, 7, 12, 3), torch.float64),
    }
    assert all(m._reductions[name] is not None for name in layout)
