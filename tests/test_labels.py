"""Boundary maps and boundary label smoothing on small hand-drawn label maps."""

import math

import pytest
import torch

from segjml.labels import boundary_label_smoothing, boundary_map, distillation_targets, near_ignore_map

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


def test_strict_ignore_drops_pixels_next_to_ignore():
    labels = torch.tensor([[[0, 0, 0, 1], [0, 0, 0, 1], [IG, 0, 0, 1]]])
    strict = boundary_label_smoothing(labels, 2, 0.5, 3, strict_ignore=True)
    assert strict.labels[0, 1, 0] == IG and strict.labels[0, 1, 1] == IG
    assert strict.labels[0, 0, 0] == 0
    assert torch.equal(near_ignore_map(labels, 3)[0, :, :2], torch.tensor([[False, False], [True, True], [True, True]]))


def test_distillation_targets_are_resized_tempered_distributions():
    logits = torch.randn(2, 4, 3, 3)
    p1 = distillation_targets(logits, (6, 6), temperature=1.0)
    p4 = distillation_targets(logits, (6, 6), temperature=4.0)
    assert p1.shape == (2, 4, 6, 6) and torch.allclose(p1.sum(1), torch.ones(2, 6, 6))
    assert p4.amax(1).mean() < p1.amax(1).mean()  # a higher temperature gives softer targets
