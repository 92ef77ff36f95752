"""Jaccard metric losses against the paper: metric properties, equations 2, 3, 7, 8, gradients, options, errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segjml.labels import boundary_label_smoothing, distillation_targets, label_smoothing
from segjml.losses import CrossEntropyLoss, JaccardMetricLoss, LovaszSoftmaxLoss, SegmentationCriterion
from segjml.losses import _functional as Fn


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Double precision for exact comparisons and gradcheck, restored after this module."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --- independent, straightforward implementations of the paper's equations (numpy, one class at a time)
def eq2_sjl_l1(x, y):
    inter = np.dot(x, y)
    return 1 - inter / (x.sum() + y.sum() - inter)


def eq3_sjl_l2(x, y):
    inter = np.dot(x, y)
    return 1 - inter / ((x**2).sum() + (y**2).sum() - inter)


def eq7_jml1(x, y):
    plus, minus = np.abs(x + y).sum(), np.abs(x - y).sum()
    return 1 - (plus - minus) / (plus + minus)


def eq8_jml2(x, y):
    inter = np.dot(x, y)
    return 1 - inter / (inter + np.abs(x - y).sum())


REFERENCE = {"jml1": eq7_jml1, "jml2": eq8_jml2, "sjl_l1": eq2_sjl_l1, "sjl_l2": eq3_sjl_l2}


def stats_of(x, y):
    """Statistics of one class, shape (1,), from plain vectors, for ``jaccard_from_statistics``."""
    t = lambda v: torch.tensor([float(v)], dtype=torch.float64)
    return {
        "sx": t(x.sum()),
        "sy": t(y.sum()),
        "inner": t(np.dot(x, y)),
        "diff": t(np.abs(x - y).sum()),
        "sx2": t((x**2).sum()),
        "sy2": t((y**2).sum()),
    }


def jml(x, y, variant="jml1"):
    return float(Fn.jaccard_from_statistics(stats_of(x, y), variant, smooth=0.0)[0])


unit_vec = arrays(np.float64, st.integers(1, 12).map(lambda n: (n,)), elements=st.floats(0, 1))


def three_vectors():
    return st.integers(1, 10).flatmap(
        lambda n: st.tuples(*[arrays(np.float64, (n,), elements=st.floats(0, 1)) for _ in range(3)])
    )


def two_vectors():
    return st.integers(1, 10).flatmap(
        lambda n: st.tuples(*[arrays(np.float64, (n,), elements=st.floats(0, 1)) for _ in range(2)])
    )


# --- Theorem 2.1: JML-1 and JML-2 are metrics on [0, 1]^p
@settings(max_examples=200, deadline=None)
@given(three_vectors())
@pytest.mark.parametrize("variant", ["jml1", "jml2"])
def test_jml_is_a_metric(variant, xyz):
    x, y, z = xyz
    d = lambda a, b: jml(a, b, variant) if (a + b).sum() > 0 else 0.0
    assert d(x, x) == pytest.approx(0.0, abs=1e-12)  # reflexive
    if not np.allclose(x, y, atol=1e-9):
        assert d(x, y) > 0  # positive
    assert d(x, y) == pytest.approx(d(y, x), abs=1e-12)  # symmetric
    assert d(x, z) <= d(x, y) + d(y, z) + 1e-9  # triangle inequality


@settings(max_examples=200, deadline=None)
@given(two_vectors())
def test_jml1_le_jml2(xy):
    x, y = xy
    if (x + y).sum() == 0:
        return
    assert jml(x, y, "jml1") <= jml(x, y, "jml2") + 1e-12


@settings(max_examples=200, deadline=None)
@given(two_vectors(), st.integers(0, 2**16))
def test_hard_labels_make_all_three_equal(xy, seed):
    x, _ = xy
    y = (np.random.default_rng(seed).random(x.shape) > 0.5).astype(float)
    if (x + y).sum() == 0:
        return
    a, b, c = jml(x, y, "jml1"), jml(x, y, "jml2"), jml(x, y, "sjl_l1")
    assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(c, abs=1e-6)


def test_single_pixel_soft_label_minimisers():
    # Section 2.2: for y = 0.5, SJL-L1 is minimised at x = 1, JML at x = y.
    xs = np.linspace(0.01, 1, 100)
    y = np.array([0.5])
    sjl = [eq2_sjl_l1(np.array([x]), y) for x in xs]
    assert xs[int(np.argmin(sjl))] == pytest.approx(1.0)
    for variant in ("jml1", "jml2"):
        values = [jml(np.array([x]), y, variant) for x in xs]
        assert xs[int(np.argmin(values))] == pytest.approx(0.5, abs=0.01)


# --- the module against the equations on real tensors
def per_class_reference(probs, y, variant):
    """Mean over classes of the equation for that class, over all pixels (no smoothing)."""
    p = probs.permute(1, 0, 2, 3).reshape(probs.shape[1], -1).numpy()
    t = y.permute(1, 0, 2, 3).reshape(y.shape[1], -1).numpy()
    return float(np.mean([REFERENCE[variant](p[c], t[c]) for c in range(p.shape[0])]))


@pytest.mark.parametrize("variant", ["jml1", "jml2", "sjl_l1", "sjl_l2"])
@pytest.mark.parametrize("kind", ["hard", "soft", "smoothed"])
def test_module_matches_equations(variant, kind):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, generator=g)
    labels = torch.randint(0, 4, (2, 6, 5), generator=g)
    labels[0, 0, 0] = 0
    labels[0, 0, 1] = 1
    labels[0, 0, 2] = 2
    labels[0, 0, 3] = 3  # noqa: E702
    if kind == "hard":
        target, dense = labels, torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).double()
    elif kind == "soft":
        dense = torch.rand(2, 4, 6, 5, generator=g).softmax(1)
        target = dense
    else:
        target = boundary_label_smoothing(labels, 4, eps=0.4, kernel_size=3)
        dense = target.to_dense()
    loss = JaccardMetricLoss(variant, smooth=0.0, active_classes="ALL")(logits, target)
    expected = per_class_reference(logits.softmax(1), dense, variant)
    assert float(loss) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("variant", ["jml1", "jml2", "sjl_l1", "sjl_l2"])
@pytest.mark.parametrize("kind", ["hard", "soft", "smoothed"])
def test_gradients_match_finite_differences(variant, kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 4), generator=g)
    labels[0, 0, 0] = 255
    target = {
        "hard": labels,
        "soft": torch.rand(1, 3, 4, 4, generator=g).softmax(1),
        "smoothed": boundary_label_smoothing(labels, 3, eps=0.5),
    }[kind]
    loss = JaccardMetricLoss(variant)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,), eps=1e-6, atol=1e-6)


def test_smoothing_is_added_to_numerator_and_denominator():
    x = np.array([0.2, 0.7, 0.1])
    y = np.array([0.0, 1.0, 0.0])  # noqa: E702
    s = stats_of(x, y)
    value = float(Fn.jaccard_from_statistics(s, "jml1", smooth=1.0)[0])
    inter = np.dot(x, y)
    assert value == pytest.approx(1 - (inter + 1) / (x.sum() + y.sum() - inter + 1))


def test_tversky_half_half_is_dice():
    x = np.array([0.2, 0.7, 0.1, 0.9])
    y = np.array([0.0, 1.0, 0.0, 1.0])  # noqa: E702
    value = float(Fn.jaccard_from_statistics(stats_of(x, y), "jml1", alpha=0.5, beta=0.5, smooth=0.0)[0])
    dice = 1 - 2 * np.dot(x, y) / (x.sum() + y.sum())
    assert value == pytest.approx(dice)


def test_log_loss_and_gamma():
    x = np.array([0.3, 0.6])
    y = np.array([0.0, 1.0])  # noqa: E702
    base = float(Fn.jaccard_from_statistics(stats_of(x, y), "jml1", smooth=0.0)[0])
    log = float(Fn.jaccard_from_statistics(stats_of(x, y), "jml1", smooth=0.0, log_loss=True)[0])
    focal = float(Fn.jaccard_from_statistics(stats_of(x, y), "jml1", smooth=0.0, gamma=2.0)[0])
    assert log == pytest.approx(-math.log(1 - base)) and focal == pytest.approx(base**2)


# --- ignore, active classes, mIoU^I / mIoU^C
def test_ignored_pixels_change_nothing():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 8, 8, generator=g)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)
    for loss in (JaccardMetricLoss(), CrossEntropyLoss(), LovaszSoftmaxLoss()):
        ref = loss(logits[:, :, :, :6], labels[:, :, :6])
        masked = labels.clone()
        masked[:, :, 6:] = 255  # noqa: E702
        other = logits.clone()
        other[:, :, :, 6:] = torch.randn(2, 5, 8, 2, generator=g) * 10  # noqa: E702
        assert float(loss(other, masked)) == pytest.approx(float(ref), abs=1e-10)
        keep = torch.ones(2, 8, 8, dtype=torch.bool)
        keep[:, :, 6:] = False  # noqa: E702
        assert float(loss(other, labels, keep)) == pytest.approx(float(ref), abs=1e-10)


def test_active_classes_modes():
    # class 0 and 1 present in the label; class 2 absent but predicted with high probability; class 3 absent, tiny.
    labels = torch.tensor([[[0, 0, 1, 1]]])
    probs = torch.tensor([[0.5, 0.1, 0.39, 0.001], [0.1, 0.5, 0.39, 0.001]]).log()  # two logits patterns
    logits = torch.stack([probs[0], probs[0], probs[1], probs[1]], dim=-1)[None, :, None, :]
    full = logits.softmax(1)[0, :, 0].T.numpy()  # (pixels, classes)
    onehot = np.eye(4)[labels[0, 0].numpy()]
    per_class = [eq7_jml1(full[:, c], onehot[:, c]) for c in range(4)]
    cases = {"PRESENT": [0, 1], "ALL": [0, 1, 2, 3], "PROB": [0, 1, 2], "BOTH": [0, 1, 2], "LABEL": [0, 1]}
    for mode, classes in cases.items():
        value = JaccardMetricLoss(smooth=0.0, active_classes=mode)(logits, labels)
        assert float(value) == pytest.approx(np.mean([per_class[c] for c in classes])), mode
    soft = torch.tensor([0.6, 0.395, 0.004, 0.001])[None, :, None, None].expand(1, 4, 1, 4)
    value = JaccardMetricLoss(smooth=0.0, active_classes="LABEL")(logits, soft)
    full_soft = soft[0, :, 0].T.numpy()
    expected = np.mean([eq7_jml1(full[:, c], full_soft[:, c]) for c in (0, 1)])  # 0.004, 0.001 <= 0.01
    assert float(value) == pytest.approx(expected)


def test_default_active_classes_differ_for_hard_and_soft():
    loss = JaccardMetricLoss(smooth=0.0)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.randn(1, 3, 2, 2)
    x = logits.softmax(1)[0].reshape(3, -1).numpy()
    hard = float(loss(logits, labels))
    assert hard == pytest.approx(eq7_jml1(x[0], np.ones(4)))  # PRESENT: class 0 only
    soft = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).double()
    expected_all = np.mean([eq7_jml1(x[c], soft[0, c].reshape(-1).numpy()) for c in range(3)])
    assert float(loss(logits, soft)) == pytest.approx(expected_all)  # ALL for soft targets


def test_miou_i_and_miou_c_weights():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 3, 4, 4, generator=g)
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[0, :2] = 1
    labels[1, :, :2] = 2
    labels[2, 0, 0] = 1  # noqa: E702
    x = logits.softmax(1).numpy()
    y = np.eye(3)[labels.numpy()].transpose(0, 3, 1, 2)
    per = np.array([[eq7_jml1(x[b, c].ravel(), y[b, c].ravel()) for c in range(3)] for b in range(3)])
    present = y.reshape(3, 3, -1).sum(-1) > 0
    miou_i = np.mean([per[b][present[b]].mean() for b in range(3)])
    miou_c = np.mean([per[:, c][present[:, c]].mean() for c in range(3) if present[:, c].any()])
    loss_i = JaccardMetricLoss(smooth=0.0, miou_d=0, miou_i=1)(logits, labels)
    loss_c = JaccardMetricLoss(smooth=0.0, miou_d=0, miou_c=1)(logits, labels)
    assert float(loss_i) == pytest.approx(miou_i) and float(loss_c) == pytest.approx(miou_c)
    both = JaccardMetricLoss(smooth=0.0, miou_d=0.0, miou_i=0.3, miou_c=0.7)(logits, labels)
    assert float(both) == pytest.approx(0.3 * miou_i + 0.7 * miou_c)


def test_class_weights_normalized_mode_is_the_weighted_mean():
    labels = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.randn(1, 2, 1, 4)
    x = logits.softmax(1)[0, :, 0].numpy()
    y = np.eye(2)[labels[0, 0].numpy()].T
    per = [eq7_jml1(x[c], y[c]) for c in range(2)]
    value = JaccardMetricLoss(smooth=0.0, class_weights=[1.0, 3.0], class_weights_mode="normalized")(logits, labels)
    assert float(value) == pytest.approx((per[0] + 3 * per[1]) / 4)


def _weighted_case():
    """Two images, three classes; class 1 appears only in image 1, so it is inactive (PRESENT) in image 0."""
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(2, 3, 3, 4, generator=g)
    labels = torch.tensor([[[0, 0, 2, 2]] * 3, [[0, 1, 1, 2]] * 3])
    x = logits.softmax(1).numpy()
    y = np.eye(3)[labels.numpy()].transpose(0, 3, 1, 2)
    per_image = np.array([[eq7_jml1(x[b, c].ravel(), y[b, c].ravel()) for c in range(3)] for b in range(2)])
    present = y.reshape(2, 3, -1).sum(-1) > 0
    per_batch = np.array([eq7_jml1(x[:, c].ravel(), y[:, c].ravel()) for c in range(3)])
    return logits, labels, per_image, present, per_batch


W = np.array([2.0, 0.5, 3.0])


def test_class_weights_scaled_mode_is_jdtloss_and_the_default():
    logits, labels, per_image, present, per_batch = _weighted_case()
    # mIoU^D: every class active in the batch; each loss times its weight, then the plain mean over classes
    default = JaccardMetricLoss(smooth=0.0, class_weights=W.tolist())(logits, labels)
    assert float(default) == pytest.approx((W * per_batch).sum() / 3)
    # mIoU^I: per image, the plain mean of w_c l_bc over that image's active classes, then the mean over images
    loss_i = JaccardMetricLoss(smooth=0.0, miou_d=0, miou_i=1, class_weights=W.tolist(), class_weights_mode="scaled")
    expected_i = np.mean([(W * per_image[b])[present[b]].mean() for b in range(2)])
    assert float(loss_i(logits, labels)) == pytest.approx(expected_i)
    # mIoU^C: per class, the mean of w_c l_bc over the images where it is active, then the plain mean over classes
    loss_c = JaccardMetricLoss(smooth=0.0, miou_d=0, miou_c=1, class_weights=W.tolist())
    expected_c = np.mean([(W[c] * per_image[:, c])[present[:, c]].mean() for c in range(3)])
    assert float(loss_c(logits, labels)) == pytest.approx(expected_c)


def test_class_weights_normalized_mode_on_every_reduction():
    logits, labels, per_image, present, per_batch = _weighted_case()
    kw = {"smooth": 0.0, "class_weights": W.tolist(), "class_weights_mode": "normalized"}
    assert float(JaccardMetricLoss(**kw)(logits, labels)) == pytest.approx((W * per_batch).sum() / W.sum())
    expected_i = np.mean([(W * per_image[b])[present[b]].sum() / W[present[b]].sum() for b in range(2)])
    assert float(JaccardMetricLoss(miou_d=0, miou_i=1, **kw)(logits, labels)) == pytest.approx(expected_i)
    per_class = np.array([per_image[:, c][present[:, c]].mean() for c in range(3)])
    expected_c = (W * per_class).sum() / W.sum()
    assert float(JaccardMetricLoss(miou_d=0, miou_c=1, **kw)(logits, labels)) == pytest.approx(expected_c)


def test_unknown_class_weights_mode_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        JaccardMetricLoss(class_weights=[1.0, 2.0], class_weights_mode="mean")
    _assert_one_line(err, "class_weights_mode 'mean'", "'scaled'", "'normalized'")


# --- cross-entropy, label smoothing, Lovasz
def test_cross_entropy_hard_and_smoothed_match_torch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 6, 6, generator=g)
    labels = torch.randint(0, 5, (2, 6, 6), generator=g)
    labels[0, 0] = 255
    ce = CrossEntropyLoss()
    assert float(ce(logits, labels)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=255))
    )
    ls = CrossEntropyLoss(label_smoothing=0.2)(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, label_smoothing=0.2)
    assert float(ls) == pytest.approx(float(ref))
    smoothed = label_smoothing(labels, 5, 0.2)
    assert float(ce(logits, smoothed)) == pytest.approx(float(ce(logits, smoothed.to_dense())))


def test_lovasz_matches_brute_force_on_small_input():
    # For one class the Lovasz extension equals sum_i m_(i) * (J(S_i) - J(S_{i-1})) over errors sorted descending.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, 1, 5, generator=g)
    labels = torch.tensor([[[0, 1, 1, 0, 1]]])
    p = logits.softmax(1)[0, :, 0].numpy()
    total = []
    for c in range(2):
        fg = (labels[0, 0].numpy() == c).astype(float)
        err = np.abs(fg - p[c])
        order = np.argsort(-err)
        prev, value = 0.0, 0.0
        for k in range(1, 6):
            wrong = set(order[:k].tolist())
            inter = sum(1 for i in range(5) if fg[i] == 1 and i not in wrong)
            union = fg.sum() + sum(1 for i in wrong if fg[i] == 0)
            jac = 1 - inter / union
            value += err[order[k - 1]] * (jac - prev)
            prev = jac
        total.append(value)
    assert float(LovaszSoftmaxLoss()(logits, labels)) == pytest.approx(np.mean(total))


# --- errors
def test_soft_target_to_lovasz_is_refused():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="hard labels"):
        LovaszSoftmaxLoss()(logits, torch.rand(1, 3, 4, 4).softmax(1))
    with pytest.raises(ValueError, match="hard labels"):
        LovaszSoftmaxLoss()(logits, label_smoothing(torch.zeros(1, 4, 4, dtype=torch.long), 3))


@pytest.mark.parametrize("loss", [JaccardMetricLoss(), CrossEntropyLoss(), LovaszSoftmaxLoss()])
def test_bad_targets_raise_clear_errors(loss):
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="class id 7 outside"):
        loss(logits, torch.full((2, 4, 4), 7))
    with pytest.raises(ValueError, match="does not match"):
        loss(logits, torch.zeros(2, 5, 4, dtype=torch.long))
    if not isinstance(loss, LovaszSoftmaxLoss):
        with pytest.raises(ValueError, match="does not match"):
            loss(logits, torch.rand(2, 4, 4, 4))


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="variant"):
        JaccardMetricLoss(variant="jml3")
    with pytest.raises(ValueError, match="active_classes"):
        JaccardMetricLoss(active_classes="SOME")


# --- the loss mix
def test_loss_mix_follows_the_recipe():
    g = torch.Generator().manual_seed(6)
    out = {"out": torch.randn(2, 4, 8, 8, generator=g), "aux": torch.randn(2, 4, 8, 8, generator=g)}
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    mix = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75)
    terms = mix(out, labels)
    ce, jm = CrossEntropyLoss(), JaccardMetricLoss()
    expected = 0.25 * (0.5 * ce(out["out"], labels) + 0.5 * ce(out["aux"], labels)) + 0.75 * jm(out["out"], labels)
    assert float(terms["total"]) == pytest.approx(float(expected))
    assert set(terms) == {"ce", "ce_aux", "iou", "total"}


def test_loss_mix_with_bls_and_teacher():
    g = torch.Generator().manual_seed(7)
    out = {"out": torch.randn(2, 4, 8, 8, generator=g), "aux": torch.randn(2, 4, 8, 8, generator=g)}
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    teacher = torch.randn(2, 4, 4, 4, generator=g)
    kd = {"mix": "label_aux"}
    mix = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75, bls={"kernel_size": 3, "eps": 0.5}, kd=kd)
    terms = mix(out, labels, teacher)
    smooth = boundary_label_smoothing(labels, 4, 0.5, 3)
    soft = torch.nn.functional.interpolate(teacher, size=(8, 8), mode="bilinear", align_corners=False).softmax(1)
    ce, jm, jt = CrossEntropyLoss(), JaccardMetricLoss(), JaccardMetricLoss(active_classes="LABEL")
    ce_main = 0.5 * ce(out["out"], smooth) + 0.5 * ce(out["out"], soft)
    jml_main = 0.5 * jm(out["out"], smooth) + 0.5 * jt(out["out"], soft)
    expected = 0.25 * (0.5 * ce_main + 0.5 * ce(out["aux"], smooth)) + 0.75 * jml_main
    assert float(terms["total"]) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="teacher"):
        mix(out, labels)


# --- distillation mixes, against the formulas written with plain torch ops
def _ce_ref(logits, labels, keep):
    """Mean over kept pixels of -log softmax(logits)[label]."""
    logp = torch.log_softmax(logits, 1)
    nll = -logp.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0]
    return (nll * keep).sum() / keep.sum()


def _probs_ref(teacher_logits, size, tau):
    """Teacher logits bilinearly resized to the label size, then softmax at temperature tau."""
    up = torch.nn.functional.interpolate(teacher_logits, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(up / tau, 1)


def _kl_ref(logits, t, keep, tau):
    """tau^2 * sum_c t (log t - log softmax(logits / tau)), explicit sum, averaged over kept pixels."""
    log_q = torch.log_softmax(logits / tau, 1)
    per_pixel = (t * (torch.log(t) - log_q)).sum(1)
    return tau**2 * (per_pixel * keep).sum() / keep.sum()


def _soft_ce_ref(logits, t, keep):
    per_pixel = -(t * torch.log_softmax(logits, 1)).sum(1)
    return (per_pixel * keep).sum() / keep.sum()


def _jml_ref(logits, y, keep, active):
    """JML-1 in the Tversky form with smoothing 1 over the whole batch, mean over the active classes.

    ``y`` (B, C, H, W) the target distribution; ``active`` picks the classes from the target: ``PRESENT`` or
    ``LABEL`` (the target's maximum over kept pixels above 0.01)."""
    x = torch.softmax(logits, 1)
    k = keep[:, None].to(x.dtype)
    losses, mask = [], []
    for c in range(x.shape[1]):
        xc, yc = x[:, c] * k[:, 0], y[:, c] * k[:, 0]
        tp = (xc.sum() + yc.sum() - (xc - yc).abs().sum()) / 2
        fp, fn = xc.sum() - tp, yc.sum() - tp
        losses.append(1 - (tp + 1) / (tp + fp + fn + 1))
        mask.append(bool(yc.sum() > 0) if active == "PRESENT" else bool(yc.max() > 0.01))
    return sum(v for v, m in zip(losses, mask) if m) / sum(mask)


def _kd_case(seed):
    g = torch.Generator().manual_seed(seed)
    out = {"out": 2 * torch.randn(2, 4, 8, 8, generator=g), "aux": 2 * torch.randn(2, 4, 8, 8, generator=g)}
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    labels[0, :2, :3] = 255
    labels[1, 6:, 5:] = 255
    teacher = {"out": 3 * torch.randn(2, 4, 4, 4, generator=g), "aux": 3 * torch.randn(2, 4, 4, 4, generator=g)}
    return out, labels, teacher


KD_WEIGHTS = {"ce_label": 0.3, "ce_teacher": 0.7, "jml_label": 0.4, "jml_teacher": 0.6}


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_authors_kd_mix_is_the_formula(tau):
    out, labels, teacher = _kd_case(21)
    kd = {**KD_WEIGHTS, "temperature": tau, "mix": "authors"}
    mix = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75, main_weight=0.6, aux_weight=0.4, kd=kd)
    assert mix.needs_teacher_aux
    terms = mix(out, labels, teacher)
    keep = labels != 255
    onehot = torch.nn.functional.one_hot(torch.where(keep, labels, 0), 4).permute(0, 3, 1, 2).double()
    t, t_aux = _probs_ref(teacher["out"], (8, 8), tau), _probs_ref(teacher["aux"], (8, 8), tau)
    s, s_aux = out["out"], out["aux"]
    main = 0.3 * _ce_ref(s, labels, keep) + 0.7 * _kl_ref(s, t, keep, tau)
    aux = 0.3 * _ce_ref(s_aux, labels, keep) + 0.7 * _kl_ref(s_aux, t_aux, keep, tau)
    jml = 0.4 * _jml_ref(s, onehot, keep, "PRESENT") + 0.6 * _jml_ref(s, t, keep, "LABEL")
    expected = 0.25 * (0.6 * main + 0.4 * aux) + 0.75 * jml
    assert float(terms["total"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms["kl_teacher"]) == pytest.approx(float(_kl_ref(s, t, keep, tau)), rel=1e-6)
    assert set(terms) == {"ce", "kl_teacher", "ce_aux", "kl_aux_teacher", "iou", "iou_teacher", "total"}


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_label_aux_kd_mix_is_the_formula(tau):
    out, labels, teacher = _kd_case(22)
    kd = {**KD_WEIGHTS, "temperature": tau, "mix": "label_aux"}
    mix = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75, main_weight=0.6, aux_weight=0.4, kd=kd)
    assert not mix.needs_teacher_aux
    terms = mix(out, labels, teacher["out"])  # the main-head logits alone are enough
    keep = labels != 255
    onehot = torch.nn.functional.one_hot(torch.where(keep, labels, 0), 4).permute(0, 3, 1, 2).double()
    t = _probs_ref(teacher["out"], (8, 8), tau)
    s = out["out"]
    main = 0.3 * _ce_ref(s, labels, keep) + 0.7 * _soft_ce_ref(s, t, keep)
    jml = 0.4 * _jml_ref(s, onehot, keep, "PRESENT") + 0.6 * _jml_ref(s, t, keep, "LABEL")
    expected = 0.25 * (0.6 * main + 0.4 * _ce_ref(out["aux"], labels, keep)) + 0.75 * jml
    assert float(terms["total"]) == pytest.approx(float(expected), rel=1e-6)
    assert set(terms) == {"ce", "ce_teacher", "ce_aux", "iou", "iou_teacher", "total"}


def test_authors_mix_distils_the_aux_head_from_the_teachers_aux_head():
    out, labels, teacher = _kd_case(23)
    keep = labels != 255
    mix = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75, kd={"temperature": 2.0})
    terms = mix(out, labels, teacher)
    from_aux = _kl_ref(out["aux"], _probs_ref(teacher["aux"], (8, 8), 2.0), keep, 2.0)
    from_main = _kl_ref(out["aux"], _probs_ref(teacher["out"], (8, 8), 2.0), keep, 2.0)
    assert float(terms["kl_aux_teacher"]) == pytest.approx(float(from_aux), rel=1e-6)
    assert abs(float(from_aux) - float(from_main)) > 1e-3  # the two teacher heads give different terms
    # changing the teacher's aux head changes only the aux teacher term
    other = mix(out, labels, {"out": teacher["out"], "aux": teacher["out"]})
    assert float(other["kl_aux_teacher"]) == pytest.approx(float(from_main), rel=1e-6)
    for key in ("ce", "kl_teacher", "ce_aux", "iou", "iou_teacher"):
        assert float(other[key]) == float(terms[key])


def test_kl_term_has_the_soft_ce_gradient_at_temperature_one():
    out, labels, teacher = _kd_case(24)
    keep = labels != 255
    mix = SegmentationCriterion(4, ce_weight=1.0, jml_weight=0.0, kd={"temperature": 1.0})
    t = _probs_ref(teacher["out"], (8, 8), 1.0)
    s1 = out["out"].clone().requires_grad_()
    (g_kl,) = torch.autograd.grad(mix._kl_teacher(s1, t, keep), s1)
    s2 = out["out"].clone().requires_grad_()
    (g_ce,) = torch.autograd.grad(_soft_ce_ref(s2, t, keep), s2)
    assert torch.allclose(g_kl, g_ce, rtol=1e-6, atol=1e-12)


def test_authors_mix_needs_aux_outputs_from_teacher_and_student():
    out, labels, teacher = _kd_case(25)
    mix = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75, kd={})
    with pytest.raises(ValueError) as err:
        mix(out, labels, teacher["out"])
    _assert_one_line(err, "teacher gave no 'aux' logits", "loss.kd.mix=label_aux", "loss.aux_weight=0")
    with pytest.raises(ValueError) as err:
        mix({"out": out["out"]}, labels, teacher)
    _assert_one_line(err, "student gave no 'aux' logits", "loss.kd.mix=label_aux", "loss.aux_weight=0")
    # without an aux term the teacher's main head is enough
    no_aux = SegmentationCriterion(4, ce_weight=0.25, jml_weight=0.75, aux_weight=0.0, kd={})
    assert not no_aux.needs_teacher_aux
    assert torch.isfinite(no_aux(out, labels, teacher["out"])["total"])


# --- one-line errors for bad loss configs
def _assert_one_line(err, *fragments):
    message = str(err.value)
    assert message and "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"ce_weight": -1}, ["loss.ce_weight=-1 is negative", ">= 0"]),
        ({"ce_weight": 0.25, "jml_weight": -1}, ["loss.jml_weight=-1 is negative", ">= 0"]),
        ({"main_weight": -0.5}, ["loss.main_weight=-0.5 is negative"]),
        ({"aux_weight": -2.0}, ["loss.aux_weight=-2.0 is negative"]),
        ({"ce_weight": float("nan")}, ["loss.ce_weight=nan", "not a number"]),
        ({"jml_weight": "abc"}, ["loss.jml_weight='abc'", "not a number"]),
        ({"ce_weight": 0, "jml_weight": 0}, ["loss.ce_weight and loss.jml_weight are both 0", "nothing would be"]),
        ({"ce_weight": 0.0, "jml_weight": 0.0, "bls": {"eps": 0.5}}, ["are both 0"]),
        ({"bls": {"kernel_size": 3, "eps": 1.5}}, ["loss.bls.eps=1.5 is outside [0, 1]"]),
        ({"bls": {"kernel_size": 3, "eps": -0.1}}, ["loss.bls.eps=-0.1 is outside [0, 1]"]),
        ({"bls": {"kernel_size": 3, "eps": float("nan")}}, ["loss.bls.eps=nan"]),
        ({"bls": {"kernel_size": 3, "eps": "big"}}, ["loss.bls.eps='big'", "[0, 1]"]),
        ({"bls": {"kernel_size": 4, "eps": 0.5}}, ["loss.bls.kernel_size=4 must be an odd positive integer or inf"]),
        ({"bls": {"kernel_size": 0, "eps": 0.5}}, ["loss.bls.kernel_size=0 must be"]),
        ({"bls": {"kernel_size": -3, "eps": 0.5}}, ["loss.bls.kernel_size=-3 must be"]),
        ({"bls": {"kernel_size": 2.5, "eps": 0.5}}, ["loss.bls.kernel_size=2.5 must be"]),
        ({"bls": {"kernel_size": "-inf", "eps": 0.5}}, ["loss.bls.kernel_size=-inf must be"]),
        ({"bls": {"kernel_size": "wide", "eps": 0.5}}, ["loss.bls.kernel_size=wide must be"]),
        ({"bls": {"kernel_sise": 3}}, ["unknown key loss.bls.kernel_sise", "kernel_size"]),
        ({"kd": {"temperature": 0}}, ["loss.kd.temperature=0", "> 0"]),
        ({"kd": {"temperature": -1.0}}, ["loss.kd.temperature=-1.0", "> 0"]),
        ({"kd": {"ce_label": -1}}, ["loss.kd.ce_label=-1 is negative"]),
        ({"kd": {"ce_teacher": -0.5}}, ["loss.kd.ce_teacher=-0.5 is negative"]),
        ({"kd": {"jml_label": -1}}, ["loss.kd.jml_label=-1 is negative"]),
        ({"kd": {"jml_teacher": -0.25}}, ["loss.kd.jml_teacher=-0.25 is negative"]),
        ({"kd": {"temprature": 2.0}}, ["unknown key loss.kd.temprature", "temperature"]),
        ({"kd": {"mix": "paper"}}, ["loss.kd.mix=paper is not one of authors, label_aux", "teacher's aux head"]),
        ({"bls": {"kernel_size": 3, "eps": 0.5, "strict_ignore": "maybe"}}, ["loss.bls.strict_ignore='maybe'", "true"]),
        ({"jml": {"variant": "jml3"}}, ["loss.jml.variant=jml3 is not one of jml1, jml2, sjl_l1, sjl_l2"]),
        ({"jml": {"active_classes_hard": "label"}}, ["loss.jml.active_classes_hard=label is not one of PRESENT, ALL"]),
        ({"jml": {"alpha": "x"}}, ["loss.jml.alpha='x' must be a number"]),
        ({"jml": {"foo": 1}}, ["unknown key loss.jml.foo; loss.jml takes variant, alpha, beta, gamma, log_loss"]),
        ({"iou_loss": "dice"}, ["loss.iou_loss=dice is not one of jml, lovasz"]),
        ({"kd": {"active_classes": "label"}}, ["loss.kd.active_classes=label is not one of PRESENT, ALL, LABEL"]),
    ],
)
def test_bad_criterion_configs_raise_one_line_errors(kwargs, fragments):
    with pytest.raises(ValueError) as err:
        SegmentationCriterion(4, **{"ce_weight": 0.25, "jml_weight": 0.75, **kwargs})
    _assert_one_line(err, *fragments)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ce_weight": 1.0, "jml_weight": 0.0},  # CE baseline
        {"ce_weight": 0.0, "jml_weight": 1.0},  # JML only
        {"ce_weight": 0.25, "jml_weight": 0.75, "aux_weight": 0.0},
        {"ce_weight": 1, "jml_weight": 0, "bls": {"kernel_size": 3, "eps": 0.5, "strict_ignore": True}},
        {"ce_weight": 0.25, "jml_weight": 0.75, "bls": {"kernel_size": "inf", "eps": 0.1}},
        {"ce_weight": 0.25, "jml_weight": 0.75, "bls": {"kernel_size": math.inf, "eps": 0.0}},
        {"ce_weight": 0.25, "jml_weight": 0.75, "bls": {"kernel_size": 5.0, "eps": 1.0}},
        {"ce_weight": 0.25, "jml_weight": 0.75, "kd": {}},
        {"ce_weight": 0.25, "jml_weight": 0.75, "kd": {"temperature": 4.0, "jml_label": 1.0, "jml_teacher": 0.0}},
        {"ce_weight": 0.25, "jml_weight": 0.75, "kd": {"temperature": 2.0, "mix": "label_aux"}},
        {"ce_weight": 1.0, "jml_weight": 0.0, "iou_loss": "lovasz"},
    ],
)
def test_valid_criterion_configs_construct_and_run(kwargs):
    g = torch.Generator().manual_seed(11)
    mix = SegmentationCriterion(4, **kwargs)
    out = {"out": torch.randn(2, 4, 8, 8, generator=g), "aux": torch.randn(2, 4, 8, 8, generator=g)}
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    teacher = None
    if mix.needs_teacher:
        teacher = {"out": torch.randn(2, 4, 4, 4, generator=g), "aux": torch.randn(2, 4, 4, 4, generator=g)}
    total = mix(out, labels, teacher)["total"]
    assert torch.isfinite(total) and float(total) > 0


def test_kernel_size_given_as_text_is_parsed():
    assert SegmentationCriterion(4, bls={"kernel_size": "5", "eps": 0.5}).bls["kernel_size"] == 5
    assert SegmentationCriterion(4, bls={"kernel_size": "Infinity", "eps": 0.5}).bls["kernel_size"] == math.inf


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        (lambda y: boundary_label_smoothing(y, 3, eps=1.5), ["eps=1.5 is outside [0, 1]"]),
        (lambda y: boundary_label_smoothing(y, 3, eps=-0.5), ["eps=-0.5 is outside [0, 1]"]),
        (lambda y: boundary_label_smoothing(y, 3, eps=float("nan")), ["eps=nan"]),
        (lambda y: boundary_label_smoothing(y, 3, eps=0.5, kernel_size=4), ["kernel_size=4 must be an odd positive"]),
        (lambda y: boundary_label_smoothing(y, 3, eps=0.5, kernel_size=0), ["kernel_size=0 must be"]),
        (lambda y: boundary_label_smoothing(y, 3, eps=0.5, kernel_size=3.5), ["kernel_size=3.5 must be"]),
        (lambda y: boundary_label_smoothing(y, 3, eps=0.5, kernel_size=-math.inf), ["kernel_size=-inf must be"]),
        (lambda y: label_smoothing(y, 3, eps=2.0), ["eps=2.0 is outside [0, 1]"]),
        (lambda y: distillation_targets(torch.zeros(1, 3, 2, 2), None, temperature=0.0), ["temperature=0.0", "> 0"]),
        (lambda y: distillation_targets(torch.zeros(1, 3, 2, 2), None, temperature=-2), ["temperature=-2", "> 0"]),
    ],
)
def test_soft_label_makers_validate_their_arguments(call, fragments):
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        call(labels)
    message = _assert_one_line(err, *fragments)
    assert "loss." not in message  # the functions do not assume a config


def test_criterion_names_the_config_key_before_the_label_maker_runs():
    with pytest.raises(ValueError) as err:
        SegmentationCriterion(4, bls={"kernel_size": 3, "eps": 1.5})
    assert str(err.value).startswith("loss.bls.eps=1.5")
