"""Semi-supervised training in the trainer (segjml/engine/ssl.py): presets, the step's wiring, resume, evaluation."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
import torch

from segjml.data.errors import DataError
from segjml.engine.checkpoint import load_checkpoint
from segjml.engine.trainer import build_run, train_step
from segjml.reproduce.grid import load_tables, select_tables
from segjml.ssl.splits import split_training_set
from tests.helpers import ROOT, compose_config, group_options, torchrun_train
from tests.test_trainer import wait_for_iteration

SSL_PRESETS = sorted(p for p in group_options("experiment") if p.startswith(("voc_dl3pr101_", "syn_ssl_")))
VOC_TRAIN_AUG = 10582
# tiny synthetic SSL runs: 80 training images, 10% labeled (8), the rest unlabeled; batch 2 + 2
TINY = [
    "dataset.train.length=80",
    "dataset.labeled=0.1",
    "dataset.val.length=4",
    "trainer.batch_size=2",
    "trainer.val_batch_size=2",
    "trainer.num_workers=0",
    "trainer.log_interval=1",
    "trainer.eval_interval=1000000",
    "trainer.progress=false",
    "logger=none",
]


def test_paper_ssl_presets_follow_the_ssl_recipe():
    """Tables 11-12: DL3+-R101 on VOC train_aug, SGD lr 0.001 wd 1e-4 poly 0.9, batch 16 + 16, 80 unlabeled epochs."""
    voc = [p for p in SSL_PRESETS if p.startswith("voc_")]
    splits = {"92", "183", "366", "732", "1464"}
    expected = {f"voc_dl3pr101_{k}_{s}" for k in ("sup", "cessl", "jmlssl") for s in splits}
    expected |= {f"voc_dl3pr101_{k}_{s}" for k in ("cessl_jmls", "jmlssl_nobls") for s in ("92", "183")}
    assert set(voc) == expected
    for name in voc:
        cfg = compose_config([f"experiment={name}"])
        split = int(name.rsplit("_", 1)[1])
        assert (cfg.dataset.name, cfg.dataset.train_split) == ("voc", "train_aug")
        assert cfg.dataset.labeled.endswith(f"/splits/pascal/{split}/labeled.txt")  # the published list
        assert (cfg.model.arch, cfg.model.encoder, cfg.pretrained) == ("deeplabv3plus", "resnet101d", True)
        assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.power) == (0.001, 1e-4, 0.9)
        assert (cfg.trainer.batch_size, cfg.ssl.unlabeled_batch_size, list(cfg.dataset.crop_size)) == (
            16,
            16,
            [512, 512],
        )
        assert cfg.trainer.max_iters == 80 * ((VOC_TRAIN_AUG - split) // 16)
        assert (cfg.ssl.eta_s, cfg.ssl.theta_s) == (0.5, 0.5)  # every row weights CE_S alike (additive ablation)
        unlabeled = (cfg.ssl.eta_u, cfg.ssl.theta_u)
        assert unlabeled == {"sup": (0.0, 0.0), "cessl_jmls": (0.5, 0.0)}.get(
            name.split("_", 2)[2][: -len(str(split)) - 1], (0.5, 0.5)
        )
        assert cfg.loss.jml_weight == (0.0 if "_sup_" in name or "_cessl_" in name and "jmls" not in name else 0.75)
        assert (cfg.loss.get("bls") is not None and cfg.loss.bls.strict_ignore) == (
            "_jmlssl_" in name and "nobls" not in name
        )


def test_tables_11_and_12_name_every_ssl_preset():
    tables = select_tables(load_tables(), "11,12")
    named = {c.experiment for t in tables for b in t.blocks for c in b.cells if c.experiment}
    assert named == {p for p in SSL_PRESETS if p.startswith("voc_")}
    assert [b.label[0] for b in tables[1].blocks] == ["L_CE,S", "+ L_CE,U", "+ L_JML,S", "+ L_JML,U", "+ BLS"]


def _two_iterations(preset: str, model: str, tmp_path) -> dict:
    extra = ["dataset=synthetic", f"model={model}", "pretrained=false", "dataset.crop_size=[64,64]"]
    overrides = [f"experiment={preset}", "trainer.max_iters=2", *TINY, *(extra if preset.startswith("voc") else [])]
    from segjml.engine import train

    return train(compose_config(overrides, tmp_path))


@pytest.mark.slow
def test_a_paper_ssl_preset_trains_two_iterations_with_its_own_model(tmp_path):
    """DL3+-R101 (random init) on the synthetic set: the preset's model, loss and SSL settings end to end."""
    assert 0.0 <= _two_iterations("voc_dl3pr101_jmlssl_92", "dl3p_r101", tmp_path)["miou"] <= 100.0


@pytest.mark.parametrize("preset", SSL_PRESETS)
def test_ssl_presets_train_two_iterations_on_the_synthetic_set(preset, tmp_path):
    """Every SSL preset's loss and SSL settings on the synthetic set (the VOC ones with the demo model)."""
    result = _two_iterations(preset, "demo", tmp_path)
    assert 0.0 <= result["miou"] <= 100.0
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    terms = {k for k in logged if k in ("ce_s", "ce_u", "jml_s", "jml_u")}
    row = preset.removeprefix("syn_ssl_").removeprefix("voc_dl3pr101_").rstrip("0123456789").rstrip("_")
    assert terms == {
        "sup": {"ce_s"},
        "cessl": {"ce_s", "ce_u"},
        "cessl_jmls": {"ce_s", "ce_u", "jml_s"},
    }.get(row, {"ce_s", "ce_u", "jml_s", "jml_u"})
    assert ("u_kept" in logged) == (row != "sup")


def test_one_step_updates_the_teacher_as_the_ema_of_the_student(tmp_path):
    """No warm-up, decay d: after one step the teacher is d * (initial weights) + (1 - d) * (student after the step);
    the teacher gets no gradient, and the unlabeled images never show their labels."""
    cfg = compose_config(["experiment=syn_ssl_jmlssl", *TINY, "ssl.ema_warmup=false", "ssl.ema_decay=0.9"], tmp_path)
    torch.manual_seed(0)
    run = build_run(cfg)
    before = {k: v.clone() for k, v in run.ssl.teacher.model.state_dict().items()}
    image, label = run.to_device(*next(iter(run.train_loader)))
    image_u = run.to_device.images(next(iter(run.ssl.unlabeled_loader))[0])
    from segjml.engine.trainer import TrainState

    terms = train_step(run, TrainState(), [(image, label)], image_u)
    assert set(terms) >= {"ce_s", "ce_u", "jml_s", "jml_u", "total"}
    student = run.model.state_dict()
    for name, teacher in run.ssl.teacher.model.state_dict().items():
        if teacher.is_floating_point():
            torch.testing.assert_close(teacher, 0.9 * before[name] + 0.1 * student[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(teacher, student[name])
    assert all(p.grad is None and not p.requires_grad for p in run.ssl.teacher.model.parameters())
    assert any(p.grad is not None for p in run.model.parameters())


def test_labeled_split_from_a_file_a_fraction_and_the_errors(tmp_path):
    cfg = compose_config(["experiment=syn_ssl_cessl", *TINY], tmp_path)
    from segjml.data import build_dataset

    raw = build_dataset(cfg.dataset, "train", transform=False)
    lab, unl = split_training_set(cfg.dataset, raw)
    assert len(lab) == 8 and sorted(lab + unl) == list(range(80)) and not set(lab) & set(unl)
    assert split_training_set(cfg.dataset, raw) == (lab, unl)  # deterministic
    listing = tmp_path / "3.txt"
    listing.write_text("5\n17\n60\n")  # the synthetic set's image ids are its indices
    cfg.dataset.labeled = str(listing)
    assert split_training_set(cfg.dataset, raw)[0] == [5, 17, 60]
    cfg.dataset.labeled = str(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="dataset.labeled=.*missing.txt: no such split file; get the published"):
        split_training_set(cfg.dataset, raw)


def test_ssl_without_a_labeled_split_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "ssl=augseg", "debug=fast", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: ssl needs a labeled split: set dataset.labeled (a count, a fraction or a split file)"
    )


def _command(log_dir):
    return [
        sys.executable,
        "train.py",
        "experiment=syn_ssl_jmlssl",
        *TINY,
        "trainer.max_iters=10",
        "trainer.ckpt_interval=1",
        f"paths.log_dir={log_dir}",
    ]


@pytest.mark.slow  # two 10-iteration SSL runs and a resumed one (about a minute)
def test_kill_9_then_rerun_of_an_ssl_run_gives_bitwise_identical_student_and_teacher(tmp_path):
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "cut"
    done = subprocess.run(_command(ref_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    at = random.Random(15).randint(2, 8)
    proc = subprocess.Popen(_command(cut_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_iteration(proc, cut_dir, at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(_command(cut_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    a, b = (load_checkpoint(next(d.rglob("last.pt"))) for d in (ref_dir, cut_dir))
    assert a["iteration"] == b["iteration"] == 10 and a["ema"]["num_updates"] == b["ema"]["num_updates"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["ema"]["model"].items():
        assert torch.equal(value, b["ema"]["model"][key]), key
    # eval.py on the checkpoint evaluates what the run evaluated: the EMA teacher
    metrics = json.loads((next(ref_dir.rglob("metrics.json"))).read_text())
    out = tmp_path / "eval"
    ckpt = next(ref_dir.rglob("last.pt"))
    ev = subprocess.run(
        [sys.executable, "eval.py", f"paths.log_dir={out}", f"ckpt='{ckpt}'", "limit_samples=4", "batch_size=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads(next(out.rglob("metrics.json")).read_text())
    for key in ("miou", "acc", "ece"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-4), key


def test_labeled_split_of_a_limited_training_set_keeps_the_seeded_pipeline(tmp_path):
    """limit_train_samples makes a Subset; the labeled Subset of it is flattened, so SeededSamples still seeds the
    augmentation of every sample (without it a run would not be reproducible)."""
    cfg = compose_config(["experiment=syn_ssl_cessl", *TINY, "trainer.limit_train_samples=40"], tmp_path)
    run = build_run(cfg)
    labeled = run.train_loader.dataset
    assert labeled.transform is not None and len(labeled) == 4  # 10% of 40
    assert run.ssl.unlabeled_loader.dataset.transform is not None and len(run.ssl.unlabeled_loader.dataset) == 36
    assert torch.equal(labeled[3][0], labeled[3][0])  # the same key gives the same augmented sample


@pytest.mark.slow
def test_torchrun_two_processes_train_an_ssl_run(tmp_path):
    """DDP: two gloo processes, each with its share of labeled and unlabeled images and its own EMA teacher."""
    cmd = torchrun_train(2, "experiment=syn_ssl_jmlssl", *TINY, "trainer.max_iters=3", f"paths.log_dir={tmp_path}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(next(tmp_path.rglob("last.pt")))
    assert state["iteration"] == 3 and state["ema"]["num_updates"] == 3
    assert 0.0 <= json.loads(next(tmp_path.rglob("metrics.json")).read_text())["miou"] <= 100.0
