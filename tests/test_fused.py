"""The fused soft-label paths equal the plain formula path (float64, 1e-10): values and gradients of JML and CE on
hard, boundary-smoothed, label-smoothed and dense soft targets with ignored pixels, every variant, every
active-class mode and every mIoU^D / I / C weighting."""

import itertools

import pytest
import torch

from segjml.labels import boundary_label_smoothing
from segjml.labels.soft_labels import SmoothedLabels
from segjml.losses import CrossEntropyLoss, JaccardMetricLoss

B, C, H, W = 2, 5, 12, 14
VARIANTS = ("jml1", "jml2", "sjl_l1", "sjl_l2")
MODES = ("PRESENT", "ALL", "LABEL", "PROB", "BOTH")
WEIGHTS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.3, 0.2))


def make(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, C, (B, H // 3 + 1, W // 3 + 1), generator=g)
    labels = labels.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :H, :W].contiguous()  # blocks: boundaries
    labels[0, :2, :3] = 255
    labels[1, 5:7, 4:9] = 255
    if kind == "hard":
        target = labels
    elif kind == "bls":
        target = boundary_label_smoothing(labels, C, eps=0.5, kernel_size=3)
    elif kind == "bls_strict":
        target = boundary_label_smoothing(labels, C, eps=0.3, kernel_size=5, strict_ignore=True)
    elif kind == "ls":
        target = boundary_label_smoothing(labels, C, eps=0.1, kernel_size=float("inf"))
    else:
        soft = torch.softmax(3 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64), 1)
        target = soft * (labels != 255)[:, None]  # ignored pixels: all-zero rows
    if isinstance(target, SmoothedLabels):
        target = SmoothedLabels(target.labels, target.eps.double(), target.num_classes, target.ignore_index)
    return logits, target


def value_and_grad(loss_fn, logits, target):
    x = logits.detach().clone().requires_grad_(True)
    value = loss_fn(x, target)
    value.backward()
    return value.detach(), x.grad


KINDS = ("hard", "bls", "bls_strict", "ls", "soft")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_jml_fused_equals_formula_for_every_mode_and_weighting(kind, variant):
    logits, target = make(kind, seed=VARIANTS.index(variant))
    for mode, (d, i, c) in itertools.product(MODES, WEIGHTS):
        args = dict(variant=variant, active_classes=mode, miou_d=d, miou_i=i, miou_c=c, threshold=0.05)
        fused = value_and_grad(JaccardMetricLoss(**args), logits, target)
        plain = value_and_grad(JaccardMetricLoss(**args, fused=False), logits, target)
        torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-10, msg=f"{mode} {d, i, c} value")
        torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=1e-10, msg=f"{mode} {d, i, c} grad")


@pytest.mark.parametrize("kind", KINDS)
def test_ce_fused_equals_formula(kind):
    logits, target = make(kind)
    fused = value_and_grad(CrossEntropyLoss(), logits, target)
    plain = value_and_grad(CrossEntropyLoss(fused=False), logits, target)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ("bls", "soft"))
def test_fused_paths_honour_an_extra_keep_mask(kind):
    logits, target = make(kind)
    keep = torch.ones(B, H, W, dtype=torch.bool)
    keep[:, ::4] = False
    for loss in (JaccardMetricLoss, CrossEntropyLoss):
        fused_fn, plain_fn = loss(), loss(fused=False)
        fused = value_and_grad(lambda x, t, f=fused_fn: f(x, t, keep), logits, target)
        plain = value_and_grad(lambda x, t, f=plain_fn: f(x, t, keep), logits, target)
        torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=1e-10)


def test_bls_paths_never_build_the_dense_target(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, C, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (2, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    target = boundary_label_smoothing(labels, C, eps=0.5, kernel_size=3)
    assert ((target.eps > 0).float().mean()) < 0.5  # boundary pixels are a minority, as in real label maps

    def refuse(self):
        raise AssertionError("a dense (B, C, H, W) target was built")

    monkeypatch.setattr(SmoothedLabels, "to_dense", refuse)
    for mode in ("PRESENT", "ALL", "LABEL", "PROB"):  # BOTH needs max(p + y) over pixels, which needs it
        value_and_grad(JaccardMetricLoss(active_classes=mode), logits, target)
    value_and_grad(CrossEntropyLoss(), logits, target)


def test_float32_fused_and_formula_agree():
    logits, target = make("bls")
    x = logits.detach().float()
    t = SmoothedLabels(target.labels, target.eps.float(), C)
    fused = value_and_grad(JaccardMetricLoss(), x, t)
    plain = value_and_grad(JaccardMetricLoss(fused=False), x, t)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-4, atol=1e-7)


def test_the_dense_node_gives_the_same_result_in_small_chunks(monkeypatch):
    from segjml.losses import _fused

    logits, target = make("soft")
    whole = value_and_grad(JaccardMetricLoss(variant="sjl_l2", active_classes="PROB"), logits, target)
    chunks = _fused._chunks
    monkeypatch.setattr(_fused, "_chunks", lambda b, c, n: chunks(b, c, n, elements=37))
    assert len(_fused._chunks(B, C, H * W)) > 10
    chunked = value_and_grad(JaccardMetricLoss(variant="sjl_l2", active_classes="PROB"), logits, target)
    plain = value_and_grad(JaccardMetricLoss(variant="sjl_l2", active_classes="PROB", fused=False), logits, target)
    for a, b in ((chunked, whole), (chunked, plain)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ("bls", "bls_strict", "soft"))
def test_the_block_by_block_corrections_give_the_same_result_in_tiny_blocks(monkeypatch, kind):
    # Smoothed pixels and ignored pixels are gathered in (C, S) blocks; blocks of one or two pixels must give the
    # values and gradients of whole-image blocks and of the formula path (ignored pixels and an extra keep mask).
    from segjml.losses import _functional, _fused

    logits, target = make(kind, seed=3)
    keep = torch.ones(B, H, W, dtype=torch.bool)
    keep[1, :, ::5] = False
    args = [dict(variant=v, active_classes="ALL", miou_d=0.5, miou_i=0.5) for v in VARIANTS]

    def run(loss):
        return value_and_grad(lambda x, t: loss(x, t, keep), logits, target)

    whole = [run(JaccardMetricLoss(**a)) for a in args]
    blocks = _functional.pixel_blocks
    tiny = lambda pixels, c: blocks(pixels, c, elements=2 * c)  # noqa: E731
    monkeypatch.setattr(_functional, "pixel_blocks", tiny)
    monkeypatch.setattr(_fused, "pixel_blocks", tiny)
    assert len(list(_fused.pixel_blocks([torch.arange(9)], C))) == 5
    for a, expected in zip(args, whole):
        small, plain = run(JaccardMetricLoss(**a)), run(JaccardMetricLoss(**a, fused=False))
        for got, ref in ((small, expected), (small, plain)):
            torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-10, msg=str(a))
            torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-10, msg=str(a))


def test_kept_sums_and_zero_ignored_match_the_masked_formula():
    from segjml.losses._functional import image_pixels, kept_sums, zero_ignored

    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 4, 6, 7, generator=g, dtype=torch.float64)
    keep = torch.rand(3, 6, 7, generator=g) > 0.3
    keep[2] = True  # an image without ignored pixels
    ignored = image_pixels(~keep)
    assert [len(i) for i in ignored] == (~keep).reshape(3, -1).sum(1).tolist()
    flat = x.reshape(3, 4, -1)
    kf = keep.reshape(3, 1, -1).double()
    torch.testing.assert_close(kept_sums(flat, ignored), (flat * kf).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(kept_sums(flat, ignored, torch.square), (flat**2 * kf).sum(-1), rtol=0, atol=1e-12)
    assert torch.equal(zero_ignored(flat.clone(), ignored), flat * kf)
    assert image_pixels(torch.zeros(2, 3, 3, dtype=torch.bool)) == []


@pytest.mark.parametrize("kind", ("hard", "bls", "soft"))
def test_a_retained_graph_gives_the_same_gradient_twice(kind):
    # The nodes keep what the backward pass needs (the BLS blocks among them) as saved tensors: a second backward
    # pass through a retained graph must find them and give the same gradient.
    logits, target = make(kind, seed=4)
    x = logits.detach().clone().requires_grad_(True)
    loss = JaccardMetricLoss(variant="jml2")(x, target)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)
    assert first.abs().sum() > 0


@pytest.mark.parametrize("kind", ("hard", "bls", "soft"))
def test_an_image_whose_pixels_are_all_ignored_adds_nothing(kind):
    # Sums over kept pixels are taken as sums over every pixel less the ignored part: an image with no kept pixel
    # must still contribute nothing (per-image mIoU^I over ALL classes sees every image).
    logits, target = make(kind, seed=6)
    keep = torch.ones(B, H, W, dtype=torch.bool)
    keep[1] = False

    def run(loss):
        return value_and_grad(lambda x, t: loss(x, t, keep), logits, target)

    for args in (dict(miou_d=1.0), dict(miou_d=0.0, miou_i=1.0, active_classes="ALL")):
        fused, plain = run(JaccardMetricLoss(**args)), run(JaccardMetricLoss(**args, fused=False))
        torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=1e-10)
        assert torch.equal(fused[1][1], torch.zeros_like(fused[1][1]))
