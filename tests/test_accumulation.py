"""Gradient accumulation keeps the loss of the whole batch: accumulate 2 x batch 4 == batch 8 (loss and gradient)."""

import dataclasses

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from segjml.engine.trainer import TrainState, accumulated_loss, build_run, plain_loss, train_step
from tests.helpers import compose_config


def _run(tmp_path, loss, extra=()):
    cfg = compose_config(
        [
            "debug=fast",
            f"loss={loss}",
            "optimizer.lr=0.0",
            "optimizer.weight_decay=0.0",
            "trainer.batch_size=8",
            *extra,
        ],
        tmp_path,
    )
    run = build_run(cfg)
    run.model.train()  # training mode: the auxiliary head is on
    for m in run.model.modules():
        # BatchNorm normalises each micro-batch by itself, and a batch of 8 draws other dropout masks than two
        # batches of 4: compare with both frozen (the replay of dropout masks is tested below)
        if isinstance(m, (_BatchNorm, torch.nn.Dropout2d)):
            m.eval()
    return run


def _batch(num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(8, 3, 32, 32, generator=g)
    # blocky labels with a few ignored pixels, so that JML's per-class sums and BLS boundaries matter
    labels = torch.randint(0, num_classes, (8, 1, 4, 4), generator=g).float()
    labels = torch.nn.functional.interpolate(labels, size=(32, 32), mode="nearest")[:, 0].long()
    labels[:, :2, :2] = 255
    return image, labels


def _step(run, micro):
    """One train_step; several micro-batches take the accumulating step, as build_run picks for accumulate_steps > 1."""
    state = TrainState()
    run = dataclasses.replace(run, loss_of=accumulated_loss if len(micro) > 1 else plain_loss)
    terms = train_step(run, state, micro)
    grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.mark.parametrize(
    "loss,extra",
    [
        ("ce_jml", ()),
        ("ce_jml_bls", ()),
        ("ce_jml", ("loss.jml.miou_d=0.5", "loss.jml.miou_i=0.25", "loss.jml.miou_c=0.25")),
    ],
)
def test_two_micro_batches_of_four_give_the_loss_and_gradient_of_one_batch_of_eight(tmp_path, loss, extra):
    torch.manual_seed(0)
    run = _run(tmp_path, loss, extra)
    image, labels = _batch(run.cfg.dataset.num_classes)
    whole_terms, whole = _step(run, [(image, labels)])
    run.model.zero_grad(set_to_none=True)
    split_terms, split = _step(run, [(image[:4], labels[:4]), (image[4:], labels[4:])])
    assert set(whole_terms) == set(split_terms)
    for key in whole_terms:
        torch.testing.assert_close(split_terms[key], whole_terms[key].detach(), rtol=1e-5, atol=1e-6)
    assert set(split) == set(whole) and len(whole) > 10
    for name, g in whole.items():
        torch.testing.assert_close(split[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_averaging_micro_batch_losses_would_not_be_the_same(tmp_path):
    """The check above can fail: the mean of per-micro-batch JML losses differs from the whole-batch JML loss."""
    torch.manual_seed(0)
    run = _run(tmp_path, "ce_jml")
    image, labels = _batch(run.cfg.dataset.num_classes)
    with torch.no_grad():
        whole = run.criterion(run.model(image), labels)["iou"]
        halves = [run.criterion(run.model(image[s]), labels[s])["iou"] for s in (slice(0, 4), slice(4, 8))]
    assert abs(float(whole) - float(sum(halves) / 2)) > 1e-4


def test_the_gradient_pass_replays_the_dropout_masks_of_the_loss_pass(tmp_path):
    """Dropout on (BatchNorm frozen): the accumulated gradient equals back-propagating, in one graph, the loss of
    the two micro-batches run one after the other from the same RNG state (the masks the loss was computed with)."""
    torch.manual_seed(0)
    run = _run(tmp_path, "ce_jml")
    for m in run.model.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.train()
    image, labels = _batch(run.cfg.dataset.num_classes)
    micro = [(image[:4], labels[:4]), (image[4:], labels[4:])]
    torch.manual_seed(123)
    _, accumulated = _step(run, micro)
    run.model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outputs = [run.model(x) for x, _ in micro]
    joined = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    run.criterion(joined, labels)["total"].backward()
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batchnorm_running_statistics_are_updated_once_per_micro_batch(tmp_path):
    torch.manual_seed(0)
    cfg = compose_config(["debug=fast", "loss=ce_jml", "trainer.batch_size=4", "trainer.accumulate_steps=2"], tmp_path)
    run = build_run(cfg)
    run.model.train()
    bns = [m for m in run.model.modules() if isinstance(m, _BatchNorm)]
    assert bns
    image, labels = _batch(cfg.dataset.num_classes)
    state = TrainState()
    terms = train_step(run, state, [(image[:4], labels[:4]), (image[4:], labels[4:])])
    assert torch.isfinite(terms["total"]) and state.iteration == 1
    assert [int(m.num_batches_tracked) for m in bns] == [2] * len(bns)


def test_accumulate_steps_below_one_is_refused(tmp_path):
    cfg = compose_config(["debug=fast", "trainer.accumulate_steps=0"], tmp_path)
    with pytest.raises(ValueError, match="trainer.accumulate_steps=0"):
        build_run(cfg)
