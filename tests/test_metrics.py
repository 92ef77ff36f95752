"""Segmentation metrics against torchmetrics and a plain NumPy computation of the definitions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassJaccardIndex
from torchmetrics.utilities.data import dim_zero_cat

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


def sparse_batch(seed, b=12, h=14, w=16, c=6):
    """Images whose ground truth lacks some classes that the prediction still shows, ignore pixels, and one image
    without any counted pixel."""
    probs, target = random_batch(seed, b=b, h=h, w=w, c=c)
    g = np.random.default_rng(seed)
    for i in range(b):
        absent = g.choice(c, size=int(g.integers(1, c - 1)), replace=False)  # at least one class stays
        stays = int(np.setdiff1d(np.arange(c), absent)[0])
        for k in absent:
            target[i][target[i] == int(k)] = stays
    target[1] = 255
    pred = probs.argmax(1)
    predicted_only = [(pred[i] == k).any() and not (target[i] == k).any() for i in range(b) for k in range(c)]
    assert sum(predicted_only) >= b  # the case where the ground-truth rule and the old rule differ
    return probs, target


def numpy_reference(probs, target, n_bins=10, k=3, q=10):
    """The definitions of docs/metrics.md, written out with NumPy loops over classes and images."""
    probs, target = probs.double().numpy(), target.numpy()
    bnd = boundary_map(torch.as_tensor(target), k).numpy()
    keep = target != 255
    c_all = probs.shape[1]
    pred = probs.argmax(1)
    out = {}

    def ece(mask):
        conf = probs.max(1)[mask]
        correct = (pred == target)[mask]
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        return sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(n_bins)) / mask.sum()

    def sce(mask, classes=range(c_all)):
        total = 0.0
        for c in classes:
            pc = probs[:, c][mask]
            yc = target[mask] == c
            bins = np.minimum((pc * n_bins).astype(int), n_bins - 1)
            total += sum(abs(yc[bins == b].sum() - pc[bins == b].sum()) for b in range(n_bins)) / mask.sum()
        return total / len(classes)

    out["ece"], out["bece"], out["sce"], out["bsce"] = ece(keep), ece(bnd), sce(keep), sce(bnd)

    # data set: per-class scores from counts over all counted pixels
    accs, ious, dices = [], [], []
    for c in range(c_all):
        gt, pr = (target == c) & keep, (pred == c) & keep
        tp, fp, fn = (gt & pr).sum(), (~gt & pr).sum(), (gt & ~pr).sum()
        if tp + fn:  # in the ground truth
            accs.append(tp / (tp + fn))
        if tp + fp + fn:  # in the ground truth or the prediction
            ious.append(tp / (tp + fp + fn))
            dices.append(2 * tp / (2 * tp + fp + fn))
    out["acc"] = (pred == target)[keep].mean()
    out["macc"], out["miou"], out["mdice"] = np.mean(accs), np.mean(ious), np.mean(dices)

    # image and class level: a class counts in an image when it is in the image's counted ground truth
    per_image = {"acc": [], "iou": [], "dice": []}
    per_class = {name: {c: [] for c in range(c_all)} for name in per_image}
    ece_i, sce_i = [], []
    for b in range(probs.shape[0]):
        if not keep[b].any():
            continue
        scores = {name: [] for name in per_image}
        for c in range(c_all):
            gt, pr = (target[b] == c) & keep[b], (pred[b] == c) & keep[b]
            if not gt.any():
                continue
            tp, fp, fn = (gt & pr).sum(), (~gt & pr).sum(), (gt & ~pr).sum()
            for name, value in (
                ("acc", tp / (tp + fn)),
                ("iou", tp / (tp + fp + fn)),
                ("dice", 2 * tp / (2 * tp + fp + fn)),
            ):
                scores[name].append(value)
                per_class[name][c].append(value)
        for name in per_image:
            per_image[name].append(np.mean(scores[name]))
        image_mask = np.zeros_like(keep)
        image_mask[b] = keep[b]
        ece_i.append(ece(image_mask))
        sce_i.append(sce(image_mask, classes=np.unique(target[b][keep[b]])))
    for name in per_image:
        values = np.sort(per_image[name])
        out[f"m{name}_i"] = np.mean(values)
        out[f"m{name}_c"] = np.mean([np.mean(v) for v in per_class[name].values() if v])
        worst = {p: np.mean(values[: max(1, p * len(values) // 100)]) for p in (q, *range(10, 101, 10))}
        out[f"{name}_i_q{q}"] = worst[q]
        out[f"{name}_i_qavg"] = np.mean([worst[p] for p in range(10, 101, 10)])
    out["ece_i"], out["sce_i"] = np.mean(ece_i), np.mean(sce_i)
    return {k: 100 * v for k, v in out.items()}


NEW_KEYS = (
    "macc",
    "mdice",
    "macc_i",
    "mdice_i",
    "macc_c",
    "mdice_c",
    "ece_i",
    "sce_i",
    "acc_i_q10",
    "iou_i_q10",
    "dice_i_q10",
    "acc_i_qavg",
    "iou_i_qavg",
    "dice_i_qavg",
)
ALL_KEYS = ("acc", "miou", "miou_i", "miou_c", "ece", "bece", "sce", "bsce", *NEW_KEYS)


@pytest.mark.parametrize("seed", [1, 2])
def test_fine_grained_iou_and_calibration_equal_numpy(seed):
    probs, target = random_batch(seed)
    m = SegmentationMetrics(C, n_bins=10, boundary_kernel=3)
    m.update(probs, target)
    r = m.compute()
    ref = numpy_reference(probs, target)
    for key in ALL_KEYS:
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key


@pytest.mark.parametrize("seed", [3, 4])
def test_every_metric_equals_numpy_with_classes_only_predicted(seed):
    # Classes missing from an image's ground truth but present in its prediction, ignore pixels, an image without
    # counted pixels; three updates of 4 images, worst_q = 20 (12 images kept 11: n = 2 of 11 for q = 20).
    probs, target = sparse_batch(seed)
    m = SegmentationMetrics(6, n_bins=10, boundary_kernel=3, worst_q=20)
    for i in range(0, 12, 4):
        m.update(probs[i : i + 4], target[i : i + 4])
    r = m.compute()
    ref = numpy_reference(probs, target, q=20)
    keys = [k.replace("q10", "q20") for k in ALL_KEYS]
    assert set(keys) | {"iou_per_class"} == set(r)
    for key in keys:
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key


def test_sce_with_many_classes_equals_numpy():
    # C > n_bins: many classes stay in the first bin everywhere, which the metric derives from totals.
    probs, target = random_batch(3, b=2, h=12, w=12, c=23)
    m = SegmentationMetrics(23, n_bins=10)
    m.update(probs, target)
    ref = numpy_reference(probs, target)
    r = m.compute()
    for key in ("sce", "sce_i"):
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key


def test_many_classes_sparse_path_and_low_confidence_pixels():
    # C = 64 takes the sparse search for p >= 1 / n_bins; near-uniform pixels have no class above 1 / n_bins,
    # so their prediction comes from the direct argmax fallback.
    probs, target = random_batch(7, b=2, h=10, w=14, c=64)
    flat = torch.randn(2, 64, 10, 14, generator=torch.Generator().manual_seed(8)).mul(0.05).softmax(1)
    probs[:, :, :5] = flat[:, :, :5]
    m = SegmentationMetrics(64, n_bins=10)
    m.update(probs, target)
    r = m.compute()
    ref = numpy_reference(probs, target)
    for key in ALL_KEYS:
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key
    keep = target != 255
    p, t = probs.permute(0, 2, 3, 1)[keep], target[keep]
    assert r["miou"] == pytest.approx(100 * float(MulticlassJaccardIndex(64)(p, t)), abs=1e-5)


def one_hot_probs(pred, c, p=0.9):
    """Probabilities with ``p`` on the class ``pred`` and the rest spread evenly."""
    return F.one_hot(pred, c).permute(0, 3, 1, 2).double().mul(p - (1 - p) / (c - 1)).add((1 - p) / (c - 1)).float()


def test_ground_truth_rule_for_image_and_class_metrics_by_hand():
    # Image A: ground truth [[0, 0], [1, 1]], prediction [[0, 2], [1, 1]] (class 2 only predicted).
    # Image B: ground truth all 0, prediction [[0, 0], [0, 1]] (class 1 only predicted).
    target = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [0, 0]]])
    pred = torch.tensor([[[0, 2], [1, 1]], [[0, 0], [0, 1]]])
    m = SegmentationMetrics(3)
    m.update(one_hot_probs(pred, 3), target)
    r = m.compute()
    # Ground-truth rule. IoU: A: class 0 1/2, class 1 1 -> 3/4; B: class 0 3/4 -> 3/4. mIoU^I = 3/4.
    # mIoU^C: class 0 (1/2 + 3/4) / 2 = 5/8, class 1 1 (image A only), class 2 never in a ground truth: left out.
    assert r["miou_i"] == pytest.approx(75.0, abs=1e-12)
    assert r["miou_c"] == pytest.approx(100 * (5 / 8 + 1) / 2, abs=1e-12)
    # The previous rule (classes in the ground truth or the prediction) gave mIoU^I = (1/2 + 3/8) / 2 = 43.75 and
    # mIoU^C = (5/8 + 1/2 + 0) / 3 = 37.5: a class only predicted pulled its image and its class down.
    assert r["miou_i"] != pytest.approx(43.75) and r["miou_c"] != pytest.approx(37.5)
    # Acc: A: 1/2, 1 -> 3/4; B: 3/4. Dice: A: 2/3, 1 -> 5/6; B: 6/7.
    assert r["macc_i"] == pytest.approx(75.0, abs=1e-12)
    assert r["mdice_i"] == pytest.approx(100 * (5 / 6 + 6 / 7) / 2, abs=1e-12)
    assert r["macc_c"] == pytest.approx(100 * ((1 / 2 + 3 / 4) / 2 + 1) / 2, abs=1e-12)
    assert r["mdice_c"] == pytest.approx(100 * ((2 / 3 + 6 / 7) / 2 + 1) / 2, abs=1e-12)
    # data set: tp = (4, 2, 0), gt = (6, 2, 0), pred = (4, 3, 1)
    assert r["macc"] == pytest.approx(100 * (4 / 6 + 1) / 2, abs=1e-12)  # classes in the ground truth
    assert r["miou"] == pytest.approx(100 * (4 / 6 + 2 / 3 + 0) / 3, abs=1e-12)  # ground truth or prediction
    assert r["mdice"] == pytest.approx(100 * (8 / 10 + 4 / 5 + 0) / 3, abs=1e-12)


def test_worst_case_metrics_by_hand():
    # 10 images of 1 x 10 pixels, ground truth all class 0; image i predicts class 0 on its first k_i pixels and
    # class 1 on the rest (class 1 is only predicted: not counted). Per-image Acc = IoU = k / 10, Dice = 2k / (k + 10).
    ks = [7, 3, 10, 1, 5, 9, 2, 8, 4, 6]
    pred = torch.tensor([[[0] * k + [1] * (10 - k)] for k in ks])
    target = torch.zeros(10, 1, 10, dtype=torch.long)
    probs = one_hot_probs(pred, 2)
    ten, twenty = SegmentationMetrics(2, worst_q=10), SegmentationMetrics(2, worst_q=20)
    for m in (ten, twenty):
        m.update(probs[:6], target[:6])
        m.update(probs[6:], target[6:])
    r10, r20 = ten.compute(), twenty.compute()
    assert r10["iou_i_q10"] == pytest.approx(10.0, abs=1e-12)  # worst 1 image: k = 1
    assert r20["iou_i_q20"] == pytest.approx(15.0, abs=1e-12)  # worst 2: (0.1 + 0.2) / 2
    assert r10["acc_i_q10"] == pytest.approx(10.0, abs=1e-12) and r20["acc_i_q20"] == pytest.approx(15.0, abs=1e-12)
    assert r10["dice_i_q10"] == pytest.approx(100 * 2 / 11, abs=1e-12)
    assert r20["dice_i_q20"] == pytest.approx(100 * (2 / 11 + 4 / 12) / 2, abs=1e-12)
    # qavg: the mean over n = 1..10 worst images of their mean IoU (n + 1) / 20: (0.1 + 0.15 + ... + 0.55) / 10
    assert r10["iou_i_qavg"] == pytest.approx(32.5, abs=1e-12) and r20["iou_i_qavg"] == pytest.approx(32.5, abs=1e-12)
    dice = sorted(2 * k / (k + 10) for k in ks)
    assert r10["dice_i_qavg"] == pytest.approx(100 * np.mean([np.mean(dice[:n]) for n in range(1, 11)]), abs=1e-12)
    assert r10["miou_i"] == pytest.approx(55.0, abs=1e-12)  # q = 100 is the plain mean
    assert "iou_i_q20" not in r10 and "iou_i_q10" not in r20


def test_worst_case_mean_counts_images_by_floor():
    values = torch.tensor([[5.0, 0.5], [1.0, 0.4], [4.0, 0.3], [2.0, 0.2], [3.0, 0.1], [6.0, 0.0], [7.0, 0.9]])
    # N = 7: q = 50 -> floor(3.5) = 3 images, q = 10 -> max(1, 0) = 1, q = 100 -> all 7
    assert torch.allclose(mf.worst_case_mean(values, 50), torch.tensor([2.0, 0.1], dtype=torch.float64))
    assert torch.allclose(mf.worst_case_mean(values, 10), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(mf.worst_case_mean(values, 100), values.double().mean(0))
    assert mf.worst_case_mean(values[:0], 10).tolist() == [0.0, 0.0]


def test_worst_q_must_be_a_percentage():
    for bad in (0, 101, 10.0, True):
        with pytest.raises(ValueError, match="worst_q"):
            SegmentationMetrics(3, worst_q=bad)


def test_no_counted_pixel_gives_zeros():
    m = SegmentationMetrics(3)
    with pytest.warns(UserWarning, match="before the ``update``"):  # no update at all
        assert all(v == 0 for k, v in m.compute().items() if k != "iou_per_class")
    probs, _ = random_batch(9, b=2, h=4, w=4, c=3)
    m.update(probs, torch.full((2, 4, 4), 255))
    r = m.compute()
    assert all(r[k] == 0 for k in ALL_KEYS) and all(np.isnan(r["iou_per_class"]))


def test_streaming_equals_one_big_update():
    probs, target = random_batch(4, b=6)
    one, many = SegmentationMetrics(C), SegmentationMetrics(C)
    one.update(probs, target)
    for i in range(6):
        many.update(probs[i : i + 1], target[i : i + 1])
    a, b = one.compute(), many.compute()
    for key in a:
        assert np.allclose(a[key], b[key], equal_nan=True), key
    many.reset()  # reset empties the per-image list too
    many.update(probs[:2], target[:2])
    one.reset()
    one.update(probs[:2], target[:2])
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
    probs, target = sparse_batch(6, b=8)
    m = SegmentationMetrics(6)
    m.update(probs[rank * 4 : (rank + 1) * 4], target[rank * 4 : (rank + 1) * 4])
    return m.compute()  # synchronised over the two processes by torchmetrics


def _metrics_on_uneven_ranks(rank, world):
    probs, target = sparse_batch(6, b=8)
    m = SegmentationMetrics(6)
    if rank == 0:  # rank 1 sees no image at all
        m.update(probs[:3], target[:3])
        m.update(probs[3:], target[3:])
    return m.compute()


@pytest.mark.parametrize("on_rank", [_metrics_on_rank, _metrics_on_uneven_ranks])
def test_ddp_two_processes_equal_one_process(on_rank):
    results = run_on_ranks(on_rank, world=2)
    probs, target = sparse_batch(6, b=8)
    single = SegmentationMetrics(6)
    single.update(probs, target)
    expected = single.compute()
    for result in results:
        assert set(result) == set(expected)
        for key in expected:
            assert np.allclose(result[key], expected[key], equal_nan=True), key


def _report_on_rank(rank, world):
    """Each process updates with its own images, all compute(); only rank 0 writes the report, as the trainer does."""
    import tempfile

    from segjml.engine import inference

    probs, target = sparse_batch(6, b=8)
    m = SegmentationMetrics(6)
    mine = slice(0, 3) if rank == 0 else slice(3, 8)
    m.update(probs[mine], target[mine])
    result = m.compute()
    if rank != 0:
        return None
    drawn = []
    inference.reliability_diagram = lambda bins, path, title="": drawn.append(bins)
    with tempfile.TemporaryDirectory() as out:
        inference.write_report(result, m, out)
    return [{k: v.tolist() for k, v in bins.items()} for bins in (drawn[0], m.reliability(boundary=True))]


@pytest.mark.slow
def test_ddp_reliability_diagram_reads_the_histograms_of_all_processes():
    # torchmetrics restores each process's own states after compute(); the report must still draw the summed ones.
    drawn, boundary = run_on_ranks(_report_on_rank, world=2)[0]
    probs, target = sparse_batch(6, b=8)
    single = SegmentationMetrics(6)
    single.update(probs[:3], target[:3])  # the same two partial sums, added in the same order: equal to the bit
    single.update(probs[3:], target[3:])
    single.compute()
    assert drawn == {k: v.tolist() for k, v in single.reliability().items()}
    assert boundary == {k: v.tolist() for k, v in single.reliability(boundary=True).items()}
    assert sum(drawn["count"]) == int((target != 255).sum())


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


def test_iou_accuracy_and_dataset_mean_from_a_confusion_matrix():
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
    assert float(mf.dataset_mean(iou)) == pytest.approx(np.nanmean(expected), abs=1e-15)
    assert float(mf.pixel_accuracy(cm)) == pytest.approx(int(cm.trace()) / int(cm.sum()), abs=1e-15)
    empty = torch.zeros(3, 3, dtype=torch.long)
    assert float(mf.dataset_mean(mf.iou_from_confusion(empty))) == 0 and float(mf.pixel_accuracy(empty)) == 0


def test_image_statistics_equal_a_python_loop():
    g = torch.Generator().manual_seed(22)
    b, c = 4, 6
    pred = torch.randint(0, c, (b, 6, 6), generator=g)
    target = torch.randint(0, c - 2, (b, 6, 6), generator=g)  # classes 4, 5 only ever predicted
    target[1, :3] = 255
    target[3] = 255  # an image without counted pixels adds nothing
    valid = target != 255
    image_means, per_class = [], {k: [] for k in range(c)}
    for i in range(b):
        scores = {}
        for k in range(c):  # a class counts in an image when it is in the image's counted ground truth
            gt, pr = (target[i] == k) & valid[i], (pred[i] == k) & valid[i]
            tp, fp, fn = int((gt & pr).sum()), int((~gt & pr).sum()), int((gt & ~pr).sum())
            if tp + fn:
                scores[k] = (tp / (tp + fn), tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn))
                per_class[k].append(scores[k])
        image_means.append(np.mean(list(scores.values()), axis=0) if scores else np.zeros(3))
    stats = mf.image_statistics(mf.image_confusion_matrices(pred, target, c, valid))
    assert stats.kept.tolist() == [True, True, True, False]
    np.testing.assert_allclose(stats.scores.numpy(), np.array(image_means), rtol=0, atol=1e-12)
    assert stats.active.tolist() == [
        [k in [kk for kk in range(c) if ((target[i] == kk) & valid[i]).any()] for k in range(c)] for i in range(b)
    ]
    expected_sum = [[sum(v[j] for v in per_class[k]) for k in range(c)] for j in range(3)]
    np.testing.assert_allclose(stats.class_score_sum.numpy(), expected_sum, rtol=0, atol=1e-12)
    assert stats.class_image_count.tolist() == [len(per_class[k]) for k in range(c)] == [3, 3, 3, 3, 0, 0]
    class_level = mf.class_mean(stats.class_score_sum, stats.class_image_count)  # classes 4, 5 left out
    expected = [np.mean([np.mean([v[j] for v in per_class[k]]) for k in range(c) if per_class[k]]) for j in range(3)]
    np.testing.assert_allclose(class_level.numpy(), expected, rtol=0, atol=1e-12)
    assert mf.class_mean(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)).tolist() == [0] * 3


def test_accuracy_and_dice_from_a_confusion_matrix():
    g = torch.Generator().manual_seed(31)
    cm = torch.randint(0, 6, (2, 5, 5), generator=g)
    cm[0, 1, :] = 0  # class 1 of matrix 0: only predicted (accuracy undefined, Dice defined)
    cm[1, :, 3], cm[1, 3, :] = 0, 0  # class 3 of matrix 1: absent (both undefined)
    acc, dice = mf.accuracy_from_confusion(cm), mf.dice_from_confusion(cm)
    for m in range(2):
        for k in range(5):
            tp, gt, pr = int(cm[m, k, k]), int(cm[m, k].sum()), int(cm[m, :, k].sum())
            assert float(acc[m, k]) == pytest.approx(tp / gt, abs=1e-15) if gt else torch.isnan(acc[m, k])
            assert float(dice[m, k]) == pytest.approx(2 * tp / (gt + pr), abs=1e-15) if gt + pr else dice[m, k].isnan()
    assert torch.isnan(acc[0, 1]) and not torch.isnan(dice[0, 1]) and torch.isnan(dice[1, 3])


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


def test_per_image_histograms_equal_one_image_at_a_time():
    probs, target = random_batch(32, b=3, h=9, w=10, c=7)
    target[2] = 255
    nb = 10
    region = mf.boundary_regions(target, 3, 255)
    conf, correct = probs.amax(1), probs.argmax(1) == target
    top = mf.calibration_histogram(conf, correct, nb, region, num_groups=2, per_image=True)
    scan = mf.top_label_and_confident_histogram(probs, conf, nb, region, num_groups=2, per_image=True)
    cls = mf.class_calibration_histogram(probs, target, nb, region, 2, confident=scan[1:], per_image=True)
    assert top.shape == (3, 2, nb, 3) and cls.shape == (3, 2, 7, nb, 3)
    for i in range(3):
        one = slice(i, i + 1)
        assert torch.equal(top[i], mf.calibration_histogram(conf[one], correct[one], nb, region[one], num_groups=2))
        alone = mf.class_calibration_histogram(probs[one], target[one], nb, region[one], num_groups=2)
        assert torch.allclose(cls[i], alone, rtol=0, atol=1e-9)
    assert cls[2].abs().sum() == 0 and top[2].abs().sum() == 0  # no counted pixel
    # without groups: one histogram per image of all its pixels
    no_group = mf.calibration_histogram(conf, correct, nb, per_image=True)
    assert no_group.shape == (3, nb, 3) and no_group[:, :, 0].sum(1).tolist() == [90.0] * 3
    assert mf.class_calibration_histogram(probs, target, nb, per_image=True).shape == (3, 7, nb, 3)
    # batched errors: one value per image, 0 for the empty one
    ece = mf.expected_calibration_error(top.sum(1))
    assert ece.shape == (3,) and ece[2] == 0
    for i in range(2):
        assert ece[i] == mf.expected_calibration_error(top[i].sum(0))
    present = torch.stack([torch.bincount(target[i][target[i] != 255], minlength=7) > 0 for i in range(3)])
    sce = mf.static_calibration_error(cls.sum(1), classes=present)
    for i in range(2):  # SCE over the classes of the image's ground truth
        h = cls[i].sum(0)[present[i]]
        n = float(cls[i, :, 0, :, 0].sum())
        assert float(sce[i]) == pytest.approx(float((h[..., 2] - h[..., 1]).abs().sum()) / (n * len(h)), abs=1e-15)
    assert sce[2] == 0


def test_metric_direction_is_mixed_and_state_layout_is_stable():
    m = SegmentationMetrics(7, n_bins=12)
    assert m.higher_is_better is None
    layout = {
        name: (tuple(getattr(m, name).shape), getattr(m, name).dtype) for name in m._defaults if name != "image_scores"
    }
    assert layout == {
        "confmat": ((7, 7), torch.long),
        "class_score_sum": ((3, 7), torch.float64),
        "class_image_count": ((7,), torch.long),
        "top_hist": ((2, 12, 3), torch.float64),
        "class_hist": ((2, 7, 12, 3), torch.float64),
    }
    assert all(m._reductions[name] is not None for name in layout)
    # per image: a list of flat float64 tensors (5 values per image), concatenated across processes
    assert m._defaults["image_scores"] == [] and m._reductions["image_scores"] is dim_zero_cat
    probs, target = random_batch(33, b=2, h=5, w=6, c=7)
    m.update(probs, target)
    assert all(t.dtype == torch.float64 and t.ndim == 1 for t in m.image_scores)
    assert sum(t.numel() for t in m.image_scores) == 2 * 5
