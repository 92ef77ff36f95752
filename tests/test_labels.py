"""Boundary maps and boundary label smoothing on small hand-drawn label maps."""

import math

import pytest
import torch

from segjml.labels import boundary_label_smoothing, boundary_map, distillation_targets, near_ignore_map
from segjml.losses import CrossEntropyLoss
from tests.helpers import group_options

IG = 255  # the ignore value

LABEL = torch.tensor(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)


def brute_force(label, k, ignore=IG):
    """Definition of section 2, pixel by pixel."""
    h, w = label.shape
    r = k // 2
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            if label[i, j] == ignore:
                continue
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    y, x = i + di, j + dj
                    if 0 <= y < h and 0 <= x < w and label[y, x] != ignore and label[y, x] != label[i, j]:
                        out[i, j] = True
    return out


def test_k3_marks_a_ring_around_the_square():
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(boundary_map(LABEL, 3), expected)


def test_k1_has_no_boundary_and_k5_grows():
    assert not boundary_map(LABEL, 1).any()
    k5 = boundary_map(LABEL, 5)
    assert k5.all()  # every pixel of a 6x6 map is within 2 pixels of the 2x2 square
    assert torch.equal(k5, brute_force(LABEL, 5))


def test_ignored_pixels_are_never_boundary_and_do_not_make_boundary():
    label = torch.tensor(
        [
            [0, 0, IG, IG],
            [0, 0, IG, IG],
            [0, 0, 2, 2],
            [0, 0, 2, 2],
        ]
    )
    out = boundary_map(label, 3)
    assert not out[label == IG].any()
    # (0, 1) touches only class 0 and ignored pixels: not boundary. (1, 1) sees class 2 at (2, 2): boundary.
    assert not out[0, 1] and out[1, 1] and out[2, 2]
    assert torch.equal(out, brute_force(label, 3))


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_matches_the_definition_on_random_maps(k):
    g = torch.Generator().manual_seed(k)
    label = torch.randint(0, 4, (2, 9, 11), generator=g)
    label[label == 3] = IG
    out = boundary_map(label, k)
    for b in range(2):
        assert torch.equal(out[b], brute_force(label[b], k))


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        boundary_map(LABEL, 4)


@pytest.mark.parametrize("bad", [4, 0, -3, 2.5, -math.inf, math.nan, True, "wide", "4", None])
def test_one_kernel_size_check_refuses_the_same_values_everywhere(bad):
    """The boundary maps, boundary label smoothing and ``loss.bls.kernel_size`` share ``check_kernel_size``."""
    from segjml.labels.boundary import check_kernel_size
    from segjml.losses import SegmentationCriterion

    with pytest.raises(ValueError, match=r"^k=.* must be an odd positive integer or inf$"):
        check_kernel_size(bad, "k")
    for call in (lambda: boundary_map(LABEL, bad), lambda: near_ignore_map(LABEL, bad)):
        with pytest.raises(ValueError, match=r"^kernel_size=.* must be an odd positive integer$"):
            call()
    with pytest.raises(ValueError, match=r"^kernel_size=.* must be an odd positive integer or inf$"):
        boundary_label_smoothing(LABEL[None], 3, kernel_size=bad)
    with pytest.raises(ValueError, match=r"^loss\.bls\.kernel_size=.* must be an odd positive integer or inf$"):
        SegmentationCriterion(3, bls={"kernel_size": bad})


def test_kernel_size_check_reads_numbers_and_text_and_inf_only_where_allowed():
    from segjml.labels.boundary import check_kernel_size

    assert [check_kernel_size(k) for k in (1, 3, 5.0, "7", "inf", "Infinity", math.inf)] == [
        1,
        3,
        5,
        7,
        *[math.inf] * 3,
    ]
    assert all(type(check_kernel_size(k)) is int for k in (3, 5.0, "7"))
    with pytest.raises(ValueError, match="^kernel_size=inf must be an odd positive integer$"):
        check_kernel_size(math.inf, allow_inf=False)
    with pytest.raises(ValueError, match="^kernel_size=inf must be an odd positive integer$"):
        boundary_map(LABEL, math.inf)
    assert torch.equal(boundary_map(LABEL, 3.0), boundary_map(LABEL, 3))  # an integral float is that integer


def test_bls_smooths_boundary_pixels_only():
    labels = LABEL[None]
    target = boundary_label_smoothing(labels, num_classes=3, eps=0.5, kernel_size=3)
    dense = target.to_dense()[0]
    ring = boundary_map(LABEL, 3)
    # boundary: (1 - eps) * onehot + eps / C; elsewhere one-hot
    assert torch.allclose(dense[:, 1, 1], torch.tensor([0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3]))
    assert torch.allclose(dense[:, 2, 2], torch.tensor([0.5 / 3, 0.5 + 0.5 / 3, 0.5 / 3]))
    assert torch.equal(dense[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(dense.sum(0), torch.ones(6, 6))
    assert torch.equal(target.eps[0] > 0, ring)


def test_k_inf_is_label_smoothing_everywhere_and_ignored_rows_are_zero():
    labels = LABEL.clone()[None]
    labels[0, 0, 0] = IG
    dense = boundary_label_smoothing(labels, 2, eps=0.2, kernel_size=math.inf).to_dense()[0]
    assert torch.equal(dense[:, 0, 0], torch.zeros(2))
    assert torch.allclose(dense[:, 5, 5], torch.tensor([0.9, 0.1]))


# A label map with a band of ignored pixels (row 2, columns 0-3) between classes 0 / 1 and class 2.
BAND = torch.tensor(
    [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [IG, IG, IG, IG, 1, 1],
        [2, 2, 2, 2, 2, 2],
        [2, 2, 2, 2, 2, 2],
    ]
)
# The default rule (REFERENCE.md section 2), worked out by hand for k = 3: (1, 2) and (1, 3) see the other class
# across the 0 / 1 edge and stay boundary although their windows also hold ignored pixels; (3, 0)-(3, 2) see only
# class 2 and ignored pixels, so they are not boundary; (3, 3) sees the 1 at (2, 4).
BAND_DEFAULT = torch.tensor(
    [
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)
# The authors' rule, by hand: boundary iff the window holds another class and no ignored pixel. Every pixel of
# rows 1-3, columns 0-4 has an ignored pixel in its window, so only row 0 and column 5 keep their boundary pixels.
BAND_STRICT = torch.tensor(
    [
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)


def test_default_rule_on_an_ignore_band():
    target = boundary_label_smoothing(BAND[None], 3, eps=0.5, kernel_size=3)
    assert torch.equal(target.eps[0] > 0, BAND_DEFAULT)
    assert torch.equal(boundary_map(BAND, 3), BAND_DEFAULT)
    assert torch.equal(target.labels[0], BAND)


def test_strict_rule_on_an_ignore_band():
    target = boundary_label_smoothing(BAND[None], 3, eps=0.5, kernel_size=3, strict_ignore=True)
    assert torch.equal(target.eps[0] > 0, BAND_STRICT)
    assert torch.equal(target.eps[0][BAND_STRICT], torch.full((4,), 0.5, dtype=target.eps.dtype))
    # the map of pixels whose window touches the band: rows 1-3, columns 0-4
    near = torch.zeros(5, 6, dtype=torch.bool)
    near[1:4, 0:5] = True
    assert torch.equal(near_ignore_map(BAND, 3), near)


def test_strict_pixels_near_ignore_keep_their_hard_label_and_count_in_the_loss():
    target = boundary_label_smoothing(BAND[None], 3, eps=0.5, kernel_size=3, strict_ignore=True)
    assert torch.equal(target.labels[0], BAND)  # nothing becomes ignored
    dense = target.to_dense()[0]
    assert torch.equal(dense[:, 1, 2], torch.tensor([1.0, 0.0, 0.0]))  # boundary under the default rule
    assert torch.equal(dense[:, 3, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(dense[:, 2, 0], torch.zeros(3))  # ignored stays ignored
    # CE against the strict target, computed by hand: every one of the 26 labelled pixels counts
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 5, 6, generator=g)
    logp = torch.log_softmax(logits[0], 0)
    total, count = 0.0, 0
    for i in range(5):
        for j in range(6):
            if BAND[i, j] == IG:
                continue
            e = 0.5 if BAND_STRICT[i, j] else 0.0
            y = torch.full((3,), e / 3)
            y[BAND[i, j]] += 1 - e
            total += float(-(y * logp[:, i, j]).sum())
            count += 1
    assert count == 26
    assert float(CrossEntropyLoss()(logits, target)) == pytest.approx(total / count)


@pytest.mark.parametrize("k", [3, 5])
def test_strict_rule_matches_its_definition_on_random_maps(k):
    g = torch.Generator().manual_seed(10 + k)
    label = torch.randint(0, 4, (2, 9, 11), generator=g)
    label[label == 3] = IG
    strict = boundary_label_smoothing(label, 3, eps=0.5, kernel_size=k, strict_ignore=True)
    r = k // 2
    for b in range(2):
        expected = torch.zeros(9, 11, dtype=torch.bool)
        for i in range(9):
            for j in range(11):
                window = label[b, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
                own = label[b, i, j]
                if own != IG and not (window == IG).any() and (window != own).any():
                    expected[i, j] = True
        assert torch.equal(strict.eps[b] > 0, expected)
        assert torch.equal(strict.labels[b], label[b])


def test_distillation_targets_are_resized_tempered_distributions():
    logits = torch.randn(2, 4, 3, 3)
    p1 = distillation_targets(logits, (6, 6), temperature=1.0)
    p4 = distillation_targets(logits, (6, 6), temperature=4.0)
    assert p1.shape == (2, 4, 6, 6) and torch.allclose(p1.sum(1), torch.ones(2, 6, 6))
    assert p4.amax(1).mean() < p1.amax(1).mean()  # a higher temperature gives softer targets


def test_every_paper_bls_preset_and_kd_teacher_uses_the_authors_rule(preset_configs):
    presets = {
        name.removeprefix("experiment="): (cfg.loss.bls, cfg.teacher.get("experiment"))
        for name, cfg in preset_configs.items()
        if name.startswith("experiment=")
    }
    assert len(presets) == len(group_options("experiment"))
    paper = {n for n in presets if n.split("_")[0] in ("cs", "voc", "ade", "dg")}
    with_bls = {n for n in paper if presets[n][0] is not None}
    assert len(with_bls) >= 41  # Tables 1-3, 8, 10, 13: every BLS cell and every KD teacher
    for name in with_bls:
        assert presets[name][0].strict_ignore is True, name
    teachers = {presets[n][1] for n in paper if presets[n][1]}
    bls_teachers = {t for t in teachers if presets[t][0] is not None}
    assert len(bls_teachers) >= 4  # the KD teachers trained with BLS (one per data set) use the authors' rule too
    for name in bls_teachers:
        assert presets[name][0].strict_ignore is True, name
    for name in presets:
        if name.split("_")[0] in ("syn", "demo") and presets[name][0] is not None:
            assert presets[name][0].strict_ignore is False, name  # the synthetic presets keep the default
