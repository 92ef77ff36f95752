"""PolyLR against the closed form of the poly schedule with linear warmup; param_groups (the recipe's groups)."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from segjml.engine.optim import PolyLR, build_optimizer, param_groups
from segjml.models import SegmentationModel, build_model

LR, MAX_ITERS, WARMUP_RATIO, START = 0.01, 1000, 0.01, 1e-6
WARMUP = 10  # round(WARMUP_RATIO * MAX_ITERS)


@pytest.fixture(autouse=True)
def seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def expected_lr(it, mult, power=0.9, min_lr=0.0, lr=LR, start=START, warmup=WARMUP, max_iters=MAX_ITERS):
    """The schedule written out: warmup ramps linearly from ``start * mult`` to the group's base rate, times the poly
    decay; after it, ``base * (1 - it / max_iters) ** power`` floored at ``min_lr``."""
    base = lr * mult
    poly = max(base * (1 - min(it, max_iters) / max_iters) ** power, min_lr)
    if it < warmup:
        first = min(start * mult, base)
        return poly / base * (first + (base - first) * it / warmup)
    return poly


def two_group_optimizer(lr=LR):
    """SGD with a group at ``lr`` (``lr_mult`` 1) and one at ``10 * lr`` (``lr_mult`` 10), as param_groups makes."""
    encoder, head = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(2, 4))
    return torch.optim.SGD(
        [{"params": [encoder], "lr": lr, "lr_mult": 1.0}, {"params": [head], "lr": 10 * lr, "lr_mult": 10.0}],
        lr=lr,
        momentum=0.9,
    )


def lrs(iters, **kwargs):
    """``[lr of each group]`` at iterations ``0 .. iters`` of a PolyLR over two_group_optimizer()."""
    optimizer = two_group_optimizer()
    scheduler = PolyLR(
        optimizer, **{"max_iters": MAX_ITERS, "warmup_ratio": WARMUP_RATIO, "warmup_start_lr": START, **kwargs}
    )
    out = []
    for _ in range(iters + 1):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_iteration_0_runs_at_the_warmup_start_lr_times_lr_mult():
    assert lrs(0)[0] == pytest.approx([START * 1, START * 10], rel=1e-12)


@pytest.mark.parametrize("power", [0.9, 1.0])
def test_warmup_is_linear_from_the_start_lr_to_the_base_rate(power):
    seen = lrs(WARMUP, power=power)
    for it in range(WARMUP + 1):
        assert seen[it] == pytest.approx([expected_lr(it, 1, power), expected_lr(it, 10, power)], rel=1e-12), it
    assert seen[WARMUP // 2][0] == pytest.approx((START + (LR - START) / 2) * (1 - 5 / MAX_ITERS) ** power)
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(seen[:WARMUP], seen[1:]))  # rises every iteration


@pytest.mark.parametrize("power", [0.9, 1.0])
def test_after_warmup_the_rate_is_poly(power):
    seen = lrs(MAX_ITERS - 1, power=power)
    for it in range(WARMUP, MAX_ITERS):
        base = [LR * (1 - it / MAX_ITERS) ** power, 10 * LR * (1 - it / MAX_ITERS) ** power]
        assert seen[it] == pytest.approx(base, rel=1e-12), it
        assert seen[it][1] == pytest.approx(10 * seen[it][0], rel=1e-12)


def test_max_iters_and_beyond_run_at_the_min_lr_floor():
    min_lr = 1e-4
    seen = lrs(MAX_ITERS + 5, min_lr=min_lr)
    for it in range(MAX_ITERS + 6):
        assert seen[it] == pytest.approx(
            [expected_lr(it, 1, min_lr=min_lr), expected_lr(it, 10, min_lr=min_lr)], rel=1e-12
        ), it
    assert seen[MAX_ITERS] == seen[MAX_ITERS + 5] == pytest.approx([min_lr, min_lr], rel=1e-12)
    assert seen[999][0] == pytest.approx(min_lr)  # 0.01 * 0.001 ** 0.9 = 2e-5 is floored ...
    assert seen[999][1] == pytest.approx(0.1 * 0.001**0.9)  # ... 2e-4 is not
    assert lrs(MAX_ITERS)[MAX_ITERS] == [0.0, 0.0]  # default floor


def test_no_warmup_starts_at_the_base_rate():
    assert lrs(0, warmup_ratio=0.0)[0] == pytest.approx([LR, 10 * LR], rel=1e-12)


def test_a_start_lr_above_the_base_rate_means_no_warmup():
    seen = lrs(WARMUP, warmup_start_lr=1.0)
    for it in range(WARMUP + 1):
        assert seen[it] == pytest.approx([LR * (1 - it / MAX_ITERS) ** 0.9, 10 * LR * (1 - it / MAX_ITERS) ** 0.9])


# --- param_groups
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("deeplabv3", "mobilenetv2_050", 3, channels=16, aux_channels=8, output_stride=32)


def check_recipe(model, groups, lr=LR, wd=5e-4, mult=10.0):
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in trainable}  # each exactly once
    encoder = {id(p) for p in model.encoder.parameters()}
    for g in groups:
        in_encoder = {id(p) in encoder for p in g["params"]}
        assert in_encoder == {g["name"].startswith("encoder")}
        assert g["lr"] == pytest.approx(lr if g["name"].startswith("encoder") else mult * lr)
        assert g["lr_mult"] == (1.0 if g["name"].startswith("encoder") else mult)
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else wd)


def test_every_trainable_parameter_is_in_exactly_one_group(model):
    groups = param_groups(model, LR, 5e-4)
    assert [g["name"] for g in groups] == ["head", "head_no_decay", "encoder", "encoder_no_decay"]
    check_recipe(model, groups)
    assert any(p.ndim == 1 for g in groups for p in g["params"])


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = build_model("pspnet", "mobilenetv2_050", 3, channels=16, aux_channels=8, output_stride=32)
    frozen = list(model.encoder.parameters())[:5]
    for p in frozen:
        p.requires_grad_(False)
    groups = param_groups(model, LR, 5e-4)
    check_recipe(model, groups)
    assert not {id(p) for p in frozen} & {id(p) for g in groups for p in g["params"]}


def test_without_no_decay_1d_every_parameter_decays(model):
    groups = param_groups(model, LR, 5e-4, head_lr_mult=5.0, no_decay_1d=False)
    assert [g["name"] for g in groups] == ["head", "encoder"]
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4]
    assert [g["lr"] for g in groups] == pytest.approx([5 * LR, LR])


def test_build_optimizer_reads_lr_and_weight_decay_from_the_partial(model):
    from functools import partial

    optimizer = build_optimizer(model, partial(torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=5e-4))
    check_recipe(model, optimizer.param_groups)
    scheduler = PolyLR(optimizer, MAX_ITERS)  # defaults: power 0.9, 1% warmup from 1e-6
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-5, 1e-6, 1e-6], rel=1e-12)
    assert scheduler.warmup == WARMUP


def test_a_wrapped_model_gives_the_groups_of_the_model(model):
    plain = param_groups(model, LR, 5e-4)
    wrapped = param_groups(nn.DataParallel(model), LR, 5e-4)
    assert [[id(p) for p in g["params"]] for g in wrapped] == [[id(p) for p in g["params"]] for g in plain]


def test_parameter_lists_that_do_not_split_the_model_are_refused(model):
    class Overlapping(SegmentationModel):
        def head_parameters(self):
            return self.parameters()

    bad = Overlapping(model.encoder, model.decoder, 3, 8)
    with pytest.raises(ValueError) as excinfo:
        param_groups(bad, LR, 5e-4)
    message = str(excinfo.value)
    assert "\n" not in message and "model Overlapping" in message and "in both" in message


def test_a_model_without_the_interface_is_refused():
    with pytest.raises(ValueError, match=r"^model Sequential does not follow segjml's model interface .*'encoder'"):
        param_groups(nn.Sequential(nn.Conv2d(3, 2, 1)), LR, 5e-4)
