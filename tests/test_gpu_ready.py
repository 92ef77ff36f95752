"""What a GPU run goes through, on the CPU: resume onto another device, this process's CUDA generator only, timm-aware
SyncBN, per-rank seeds, one resume decision for all ranks, an unused auxiliary head, one evaluation precision, device
mapping errors, the GPU settings and the timing of asynchronous work."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from segjml.engine import distributed as D
from segjml.engine import train
from segjml.engine import trainer as T
from segjml.engine.checkpoint import load_checkpoint
from segjml.utils import build
from segjml.utils.rng import capture_rng_state, restore_rng_state
from tests.distributed import run_on_ranks
from tests.helpers import compose_config

FAST = ["debug=fast", "trainer.max_iters=2"]


def config(tmp_path, *extra):
    cfg = compose_config([*FAST, *extra])
    cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_resume_loads_the_checkpoint_on_the_cpu_whatever_the_run_device(tmp_path):
    """On a GPU the checkpoint used to be loaded onto the GPU, where its RNG states cannot be restored; ``meta``
    stands in for the other device."""
    train(config(tmp_path))
    cfg = config(tmp_path, "trainer.max_iters=3")
    dist, device = D.init_distributed("cpu")
    run = T.build_run(cfg, dist, device)
    run.device = torch.device("meta")
    state = T.resume(run)
    assert state.iteration == 2
    momentum = [s["momentum_buffer"] for s in run.optimizer.state.values()]
    assert momentum and all(m.device.type == "cpu" for m in momentum)


def test_cuda_generator_of_this_process_device_only_is_saved_and_restored(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))

    def every_gpu(*args):
        raise AssertionError("every visible GPU's generator was read")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    cpu_state = torch.get_rng_state()
    state = capture_rng_state(torch.device("cuda", 1))  # rank 1 of a node
    assert int(state["cuda"][0]) == 1
    # resumed as the only GPU a task sees (CUDA_VISIBLE_DEVICES=<one GPU>): its generator is cuda:0
    restore_rng_state(state, torch.device("cuda", 0))
    assert calls == [(1, torch.device("cuda", 0))]
    # a checkpoint of the former format (every GPU's generator) gives this process's own
    restore_rng_state({**state, "cuda": [torch.tensor([7]), torch.tensor([8])]}, torch.device("cuda", 1))
    assert calls[-1] == (8, torch.device("cuda", 1))
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_syncbn_conversion_keeps_the_activations_of_timm_norm_layers():
    cfg = compose_config(["model=dl3_mb2", "pretrained=false"])
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    for module in model.modules():  # statistics other than 0 / 1, so that a dropped activation shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    converted = T.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) > 0
    with torch.no_grad():
        expected = model(x)["out"]
        assert torch.equal(converted(x)["out"], expected)
        # what torch's own converter does to BatchNormAct2d (the bug this guards against)
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert (plain(x)["out"] - expected).abs().max() > 1.0


def _ddp_run_on_rank(rank, world):
    """Build the run of rank ``rank``, draw a dropout mask, resume (the run directory holds a single-process
    ``last.pt`` at iteration 2, which only rank 0 can see), then train 3 steps with ``loss.aux_weight=0``."""
    import os

    cfg = compose_config([*FAST, "trainer.max_iters=5", "loss.aux_weight=0"])
    cfg.paths.output_dir = os.environ["DDP_TEST_DIR"]
    if rank == 1:  # a lagging shared file system: last.pt is not there yet for this rank
        T.find_resumable = lambda path: None
    run = T.build_run(cfg, D.DistInfo(rank, world, rank), torch.device("cpu"))
    weights = sum(float(p.detach().double().sum()) for p in run.model.parameters())
    mask = torch.nn.functional.dropout(torch.ones(64), 0.5)
    state = T.resume(run)
    data = T.batches(run.train_loader, state.iteration)
    for _ in range(3):
        terms = T.train_step(run, state, [run.to_device(*next(data))])
    return weights, mask, state.iteration, float(terms["total"])


@pytest.mark.slow
def test_under_ddp_ranks_share_weights_and_resume_but_draw_their_own_masks_and_train_without_the_aux_loss(
    tmp_path, monkeypatch
):
    train(config(tmp_path, "loss.aux_weight=0", "trainer.max_iters=2"))  # last.pt at iteration 2
    monkeypatch.setenv("DDP_TEST_DIR", str(tmp_path))
    (w0, mask0, it0, loss0), (w1, mask1, it1, loss1) = run_on_ranks(_ddp_run_on_rank, world=2)
    assert w0 == w1  # the same initial weights
    assert not torch.equal(mask0, mask1)  # dropout draws other masks on each rank
    assert it0 == it1 == 5  # both resumed at 2 (rank 0's decision), then 3 steps with an aux head nobody reads
    assert all(v == v for v in (loss0, loss1))


def test_accumulation_with_an_unused_aux_head(tmp_path):
    result = train(config(tmp_path, "loss.aux_weight=0", "trainer.accumulate_steps=2"))
    assert 0 <= result["miou"] <= 100
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2


def test_validation_during_bf16_training_reports_what_eval_py_reports(tmp_path):
    """One precision rule: evaluations run in float32, during training as in eval.py."""
    from segjml.config import compose
    from segjml.engine.commands import evaluate_checkpoint

    run = config(tmp_path / "run", "trainer.precision=bf16", "trainer.limit_val_samples=4", "trainer.val_batch_size=2")
    train(run)
    logged = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cfg = compose(
        [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "limit_samples=4", "batch_size=2", "num_workers=0"],
        config_name="eval",
        output_dir=tmp_path / "eval",
    )
    (tmp_path / "eval").mkdir()  # what Hydra makes before eval.py runs
    evaluated = evaluate_checkpoint(cfg)
    for key in ("acc", "miou", "ece", "sce", "bece"):
        assert logged[key] == evaluated[key], key


def test_a_bad_device_mapping_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError) as caught:
        D.resolve_device("auto", local_rank=3)
    assert str(caught.value) == (
        "LOCAL_RANK=3 asks for GPU 3 but torch sees 2 (CUDA_VISIBLE_DEVICES=4,5); start at most 2 process(es) per "
        "node (torchrun --nproc_per_node) or make more GPUs visible"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"^trainer.device=cuda:0 under torchrun puts every process on that one GPU"):
        D.init_distributed("cuda:0")


def test_gpu_settings_and_full_float32_loss_matmuls():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        D.set_backend_policy(torch.device("cuda"), cudnn_benchmark=True, tf32=True, deterministic=False)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        with D.full_float32_matmuls(), D.cudnn_benchmark_off():
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        D.set_backend_policy(torch.device("cuda"), cudnn_benchmark=True, tf32=False, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        D.set_backend_policy(torch.device("cuda"), before[1], False, False)
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.deterministic = False


def test_asynchronous_work_is_waited_for_only_when_the_times_are_read():
    waits = []
    meter = T.Meter(0, sync=lambda: waits.append(1))
    for _ in range(3):
        meter.lap("data"), meter.lap("step"), meter.lap()
    assert waits == []
    meter.read(3)
    assert waits == [1]
