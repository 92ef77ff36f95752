"""The losses compute in float32 inside a user's ``torch.autocast`` region (bf16 and fp16 on the CPU, logits given in
float32 or in the low dtype): every loss preset and the loss modules on every target kind give the float32 loss and
gradient of the same logit values. ``torch.compile`` of the criterion (the fused nodes included) gives eager's loss
and gradient."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from segjml.labels import boundary_label_smoothing
from segjml.losses import CrossEntropyLoss, JaccardMetricLoss, LovaszSoftmaxLoss, SegmentationCriterion
from tests.helpers import compose_config, group_options

B, H, W = 2, 16, 16
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Inside the region the loss runs the same float32 kernels as outside (autocast is off within it), so values and
# gradients agree to float32 rounding; measured: bit for bit. A matrix product left to autocast shows as bf16 / fp16
# rounding, ~4e-3 / ~5e-4 relative, far above this.
RTOL, ATOL = 1e-6, 1e-9


@functools.cache
def preset(loss: str) -> tuple[SegmentationCriterion, int, int]:
    """The criterion of ``configs/loss/<loss>.yaml``, the data set's class count and ignore index."""
    cfg = compose_config([f"loss={loss}"])
    return instantiate(cfg.loss), cfg.dataset.num_classes, cfg.dataset.ignore_index


def batch(c: int, ignore_index: int, seed: int = 0):
    """Student outputs (main and auxiliary head), labels in 4x4 blocks (so BLS has boundaries) with ignored pixels,
    and a teacher's outputs at half the resolution (the bilinear resize is part of the loss)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (B, H // 4, W // 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels = labels.contiguous()
    labels[0, :2, :3] = ignore_index
    labels[1, 5:7, 4:9] = ignore_index
    outputs = {k: 2 * torch.randn(B, c, H, W, generator=g) for k in ("out", "aux")}
    teacher = {k: 2 * torch.randn(B, c, H // 2, W // 2, generator=g) for k in ("out", "aux")}
    return outputs, labels, teacher


def loss_and_grads(criterion, outputs, labels, teacher, autocast=None):
    """The criterion's terms and the gradient of ``total`` w.r.t. each head's logits; the forward pass inside
    ``torch.autocast("cpu", dtype=autocast)`` (none: outside), the backward pass outside, as PyTorch advises."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        terms = criterion(leaves, labels, teacher if criterion.needs_teacher else None)
    terms["total"].backward()
    return {k: v.detach() for k, v in terms.items()}, {k: v.grad for k, v in leaves.items()}


def assert_float32_result(got, expected):
    """``got`` (values, grads) equals ``expected``, the float32 result on the same logit values: loss terms in float32,
    each gradient in its logits' dtype (autograd rounds it to theirs), so compared to the reference rounded so."""
    (terms, grads), (ref_terms, ref_grads) = got, expected
    assert terms.keys() == ref_terms.keys()
    for key, ref in ref_terms.items():
        assert terms[key].dtype == torch.float32, key
        torch.testing.assert_close(terms[key], ref, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")
    for key, grad in grads.items():
        expected_grad = ref_grads[key].to(grad.dtype)
        torch.testing.assert_close(grad, expected_grad, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"d/d{key}: {m}")


@pytest.mark.parametrize("given", ("float32", "low"), ids=("logits_fp32", "logits_low"))
@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("loss", group_options("loss"))
def test_every_loss_preset_computes_in_float32_inside_autocast(loss, low, given):
    criterion, c, ignore_index = preset(loss)
    outputs, labels, teacher = batch(c, ignore_index)
    if given == "low":  # the reference takes the same rounded values, in float32
        outputs = {k: v.to(LOW[low]) for k, v in outputs.items()}
        teacher = {k: v.to(LOW[low]) for k, v in teacher.items()}
    expected = loss_and_grads(
        criterion, {k: v.float() for k, v in outputs.items()}, labels, {k: v.float() for k, v in teacher.items()}
    )
    assert_float32_result(loss_and_grads(criterion, outputs, labels, teacher, LOW[low]), expected)


LOSSES = {
    "jml1": JaccardMetricLoss,
    "sjl_l2": functools.partial(JaccardMetricLoss, variant="sjl_l2", active_classes="BOTH"),
    "jml_formula": functools.partial(JaccardMetricLoss, fused=False),
    "ce": CrossEntropyLoss,
    "ce_formula": functools.partial(CrossEntropyLoss, fused=False),
}


def module_target(kind: str, labels: torch.Tensor, c: int, g: torch.Generator):
    if kind == "hard":
        return labels
    if kind == "bls":
        return boundary_label_smoothing(labels, c, eps=0.5, kernel_size=3)
    if kind == "ls":
        return boundary_label_smoothing(labels, c, eps=0.1, kernel_size=float("inf"))
    return torch.softmax(3 * torch.randn(B, c, H, W, generator=g), 1) * (labels != 255)[:, None]  # dense soft


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("kind", ("hard", "bls", "ls", "soft"))
@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_module_computes_in_float32_inside_autocast(name, kind, low):
    """A library user calls the loss modules themselves, fused or on the formula path (whose ``einsum`` sums would
    autocast)."""
    c = 5
    outputs, labels, _ = batch(c, 255, seed=1)
    target = module_target(kind, labels, c, torch.Generator().manual_seed(2))
    results = []
    for autocast in (None, LOW[low]):
        x = outputs["out"].to(LOW[low]).requires_grad_(True)  # logits in the low dtype: the harder case
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            value = LOSSES[name]()(x if autocast else x.float(), target)
        value.backward()
        results.append(({"loss": value.detach()}, {"out": x.grad}))
    assert_float32_result(results[1], results[0])


def test_lovasz_computes_in_float32_inside_autocast():
    outputs, labels, _ = batch(5, 255, seed=3)
    x = outputs["out"].bfloat16()
    expected = LovaszSoftmaxLoss()(x.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = LovaszSoftmaxLoss()(x, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=RTOL, atol=ATOL)


def compiled_and_eager(loss: str, backend: str, autocast=None):
    """Loss and logits gradients of the criterion of preset ``loss``: eager in float32, and ``torch.compile``d with
    ``backend`` (called inside ``torch.autocast`` when ``autocast`` is a dtype)."""
    torch._dynamo.reset()  # each case compiles from scratch: no cache hits or recompile limits from other cases
    criterion, c, ignore_index = preset(loss)
    outputs, labels, teacher = batch(c, ignore_index, seed=4)

    def step(outputs, labels, teacher):
        return criterion(outputs, labels, teacher if criterion.needs_teacher else None)["total"]

    results = []
    for fn, region in ((step, None), (torch.compile(step, backend=backend), autocast)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
        with torch.autocast("cpu", dtype=region or torch.bfloat16, enabled=region is not None):
            value = fn(leaves, labels, teacher)
        value.backward()
        results.append((value.detach(), {k: v.grad for k, v in leaves.items()}))
    return results


# Compiled code may sum in another order (AOTAutograd's decompositions, inductor's fused reductions): float32
# rounding, measured <= 1.2e-7 on the loss and <= 1.2e-10 on gradients of ~6e-4 (2e-7 relative).
COMPILE_RTOL, COMPILE_ATOL = 1e-5, 1e-8


def assert_same(compiled, eager):
    torch.testing.assert_close(compiled[0], eager[0], rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
    for key, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][key], grad, rtol=COMPILE_RTOL, atol=COMPILE_ATOL, msg=key)


@pytest.mark.parametrize(
    "loss, autocast",
    [
        pytest.param("ce_jml", None, id="hard", marks=pytest.mark.slow),
        pytest.param("ce_jml_bls", None, id="bls"),  # make test: this case; make test-slow: the others
        pytest.param("ce_jml_kd", None, id="kd", marks=pytest.mark.slow),
        pytest.param("ce_jml_bls", torch.bfloat16, id="bls_in_bf16_autocast", marks=pytest.mark.slow),
    ],
)
def test_compiled_criterion_gives_the_eager_loss_and_gradient(loss, autocast):
    """``aot_eager`` traces what inductor traces (dynamo, AOTAutograd through the fused autograd Functions and their
    backward passes) and compiles in 7-18 s a case; inductor's C++ code generation takes 35-60 s a case on two
    shared CPU cores, so it has its own slow test below."""
    eager, compiled = compiled_and_eager(loss, "aot_eager", autocast)
    assert_same(compiled, eager)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ("ce_jml", "ce_jml_bls"), ids=("hard", "bls"))
def test_inductor_compiled_criterion_gives_the_eager_loss_and_gradient(loss):
    eager, compiled = compiled_and_eager(loss, "inductor")
    assert_same(compiled, eager)
