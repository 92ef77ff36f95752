"""Experiment presets, the reproduction grid, the table builder and the figures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from segjml.reproduce.figures import figure1_curves
from segjml.reproduce.grid import (
    SMOKE_RESULTS,
    GridError,
    Run,
    build_grid,
    experiment_names,
    load_tables,
    override_dirname,
    select_tables,
    teacher_of,
)
from segjml.reproduce.tables import build_tables
from tests.helpers import ROOT, compose_config

PAPER_TABLES = {"1", "2", "3", "4", "5", "6", "7", "8", "10", "13", "14", "15"}
DATASETS = {"cs": "cityscapes", "voc": "voc", "ade": "ade20k", "dg": "deepglobe_land", "syn": "synthetic"}
# Table 9 (docs/models.md): model name -> (arch, encoder)
MODELS = {
    "dl3r101": ("deeplabv3", "resnet101d"),
    "dl3r50": ("deeplabv3", "resnet50d"),
    "dl3r18": ("deeplabv3", "resnet18d"),
    "dl3mb2": ("deeplabv3", "mobilenetv2_100"),
    "pspr18": ("pspnet", "resnet18d"),
    "unetr50": ("unet", "resnet50d"),
    "unetr18": ("unet", "resnet18d"),
    "unetmb2": ("unet", "mobilenetv2_100"),
    "segformerb5": ("segformer", "mit_b5"),
    "segformerb3": ("segformer", "mit_b3"),
    "segformerb1": ("segformer", "mit_b1"),
    "segformerb0": ("segformer", "mit_b0"),
}
PAPER_PRESETS = sorted(n for n in experiment_names() if n.split("_")[0] in ("cs", "voc", "ade", "dg"))
# Tables 11-12 (semi-supervised) follow the SSL recipe of Appendix I, checked in tests/test_ssl_training.py
SUPERVISED_PRESETS = [n for n in PAPER_PRESETS if not n.startswith("voc_dl3pr101_")]


@cache
def resolved(experiment: str) -> dict:
    return OmegaConf.to_container(
        compose_config([f"experiment={experiment}"], Path("/tmp/segjml-unused")), resolve=True
    )


def test_every_paper_table_is_described_and_every_cell_has_a_preset():
    tables = load_tables()
    assert PAPER_TABLES <= set(tables)
    names = experiment_names()
    cells = 0
    for table in tables.values():
        for run in table.runs():
            assert run.experiment in names, f"table {table.key}: no preset {run.experiment}"
            cells += 1
    # the paper's Tables 1/2 have 26 trained cells each (R101 and R50 have no KD), Table 3 20, Table 13 16
    assert sum(c.experiment is not None for b in tables["2"].blocks for c in b.cells) == 26
    assert sum(c.experiment is not None for b in tables["3"].blocks for c in b.cells) == 20
    assert sum(c.experiment is not None for b in tables["13"].blocks for c in b.cells) == 16
    # every paper preset serves some table
    used = {r.experiment for t in tables.values() for r in t.runs()}
    assert set(PAPER_PRESETS) == used


@pytest.mark.parametrize("experiment", SUPERVISED_PRESETS)
def test_paper_presets_follow_the_paper_recipes(experiment):
    prefix, model, variant = re.fullmatch(r"([a-z]+)_([a-z0-9]+)_(.+)", experiment).groups()
    cfg = resolved(experiment)
    assert cfg["name"] == experiment
    assert cfg["pretrained"] is True and cfg["model"]["pretrained"] is True
    assert cfg["dataset"]["name"] == DATASETS[prefix]
    assert (cfg["model"]["arch"], cfg["model"]["encoder"]) == MODELS[model]
    t, opt, sched = cfg["trainer"], cfg["optimizer"], cfg["scheduler"]
    assert t["batch_size"] == (16 if variant.endswith("_b16") else 8)
    assert t["max_iters"] == (10_000 if prefix == "dg" else 40_000)
    if prefix == "ade":
        assert opt["_target_"] == "torch.optim.AdamW" and opt["lr"] == 6e-5 and opt["weight_decay"] == 0.01
        assert sched["power"] == 1.0
    else:
        assert opt["_target_"] == "torch.optim.SGD" and opt["lr"] == 0.01
        assert opt["momentum"] == 0.9 and opt["weight_decay"] == 5e-4 and sched["power"] == 0.9
    crop = {"cs": [512, 1024]}.get(prefix, [512, 512])
    assert cfg["dataset"]["crop_size"] == crop

    loss = cfg["loss"]
    assert loss["main_weight"] == loss["aux_weight"] == 0.5
    m = re.fullmatch(r"jml_ce(\d\d)", variant)
    if variant.startswith("ce"):
        assert (loss["ce_weight"], loss["jml_weight"]) == (1.0, 0.0)
    elif m:
        ce = int(m.group(1)) / 100
        assert loss["ce_weight"] == pytest.approx(ce) and loss["jml_weight"] == pytest.approx(1 - ce)
    elif variant == "lovasz":  # Lovasz-Softmax has its own weight and no jml block (the schema's null, weight 0)
        assert (loss["ce_weight"], loss["lovasz_weight"]) == (0.25, 0.75)
        assert loss["jml_weight"] == 0.0 and loss["jml"] is None
    else:
        assert (loss["ce_weight"], loss["jml_weight"]) == (0.25, 0.75)
    expected_iou = {"jml2": ("jml", "jml2"), "sjl1": ("jml", "sjl_l1"), "sjl2": ("jml", "sjl_l2")}
    head = variant.split("_")[0]
    if head in expected_iou:
        assert (loss["iou_loss"], loss["jml"]["variant"]) == expected_iou[head]
    elif head == "lovasz":
        assert loss["iou_loss"] == "lovasz" and loss["bls"] is None and loss["kd"] is None
    elif head in ("jml", "ce"):
        assert loss["jml"]["variant"] == "jml1"
    if head != "lovasz":
        assert loss["jml"]["smooth"] == 1.0 and loss["jml"]["active_classes_hard"] == "PRESENT"

    if "bls" in variant.split("_"):
        assert loss["bls"]["kernel_size"] == 3
        assert loss["bls"]["eps"] == (0.1 if variant.endswith("eps01") else 0.5)
    else:
        assert loss["bls"] is None
    if "kd" in variant or variant == "jml_cekd":
        kd = loss["kd"]
        assert kd["temperature"] == 1.0 and kd["ce_label"] == kd["ce_teacher"] == 0.5
        active = {"all": "ALL", "present": "PRESENT", "prob": "PROB", "both": "BOTH"}.get(variant.split("_")[-1])
        assert kd["active_classes"] == (active or "LABEL")
        if variant == "jml_cekd":  # Table 6 row 3: no JML on the teacher
            assert (kd["jml_label"], kd["jml_teacher"]) == (1.0, 0.0)
        else:
            assert kd["jml_label"] == kd["jml_teacher"] == 0.5
        teacher = cfg["teacher"]["experiment"]
        assert teacher in experiment_names() and teacher.startswith(prefix + "_")
        assert teacher_of(teacher) is None, "a teacher is trained from labels"
        assert f"/{teacher}/" in cfg["teacher"]["checkpoint"]
        assert ("dataset.fold=" in cfg["teacher"]["checkpoint"]) == (prefix == "dg")
    else:
        assert loss["kd"] is None and cfg["teacher"]["experiment"] is None


def test_grid_trains_teachers_first_once_each():
    grid = build_grid(list(load_tables().values()))
    runs = grid.runs
    keys = [(r.experiment, r.overrides) for r in runs]
    assert len(keys) == len(set(keys))
    stage_of = {(r.experiment, r.overrides): i for i, stage in enumerate(grid.stages) for r in stage}
    students = [r for r in runs if r.teacher is not None]
    assert students
    for run in students:
        teacher = (run.teacher.experiment, run.teacher.overrides)
        assert stage_of[teacher] < stage_of[(run.experiment, run.overrides)]
        assert run.teacher.overrides == ((run.fold is not None and (f"dataset.fold={run.fold}",)) or ("seed=0",))
    # Table 2 needs 26 cells x 3 seeds; Table 13 16 cells x 5 folds
    assert len(load_tables()["2"].runs()) == 78 and len(load_tables()["13"].runs()) == 80


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=voc_dl3r18_jml", "seed=2"],
        ["experiment=dg_unetr18_jml_kd", "dataset.fold=3", "trainer.precision=bf16", "teacher.checkpoint='a/b=c.pt'"],
        [
            "experiment=voc_dl3r18_jml_bls",
            "seed=0",
            "loss.bls.kernel_size=inf",
            "loss.bls.eps=0.1",
            "trainer.num_workers=8",
            "paths.log_dir=/x",
        ],
        ["experiment=cs_dl3r18_ce", "seed=1", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
    ],
)
def test_run_directories_follow_hydras_rule(overrides):
    """The grid's directory of a run is the one Hydra itself derives (``hydra.run.dir``) for the same command."""
    cfg = compose_config(overrides)
    assert Path(cfg.paths.output_dir) == Path(cfg.paths.log_dir) / cfg.name / override_dirname(overrides)


def test_select_tables_accepts_lists_and_refuses_unknown_keys():
    tables = load_tables()
    assert [t.key for t in select_tables(tables, "2, table4,fig5")] == ["2", "4", "fig5"]
    assert len(select_tables(tables, "all")) == len(tables)
    with pytest.raises(GridError, match="no table '9'"):
        select_tables(tables, "2,9")


def test_dry_run_lists_every_run_with_its_command(tmp_path):
    done = Run("voc_dl3r18_ce", ("seed=1",)).run_dir(tmp_path)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--dry-run", "--tables", "2,8", "--log-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    grid = build_grid(select_tables(load_tables(), "2,8"))
    commands = [line for line in lines if line.startswith("python train.py")]
    finished = [line for line in lines if line.startswith("# done: python train.py")]
    assert len(commands) + len(finished) == len(grid.runs)
    assert finished == [f"# done: python train.py experiment=voc_dl3r18_ce seed=1 paths.log_dir={tmp_path}"]
    # teachers (stage 1) are listed before their students
    first_student = next(i for i, line in enumerate(lines) if "teacher.checkpoint" in line)
    teacher_line = next(i for i, line in enumerate(lines) if "experiment=voc_dl3r50_jml_bls seed=0" in line)
    assert teacher_line < first_student
    assert not any(tmp_path.glob("*/*/checkpoints")), "a dry run trains nothing"


def _fabricate(log_dir: Path, run: Run, **metrics) -> None:
    path = run.run_dir(log_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_table_builder_reproduces_the_papers_own_fold_statistics(tmp_path):
    """Table 14 gives per-fold mIoU and their mean ± std: fed the folds, the builder must print the paper's stats."""
    folds = {
        "dg_unetr18_ce_kd": [64.93, 67.47, 66.22, 66.37, 67.00],
        "dg_unetr18_jml_kd": [67.20, 67.96, 67.50, 67.62, 67.84],
        "dg_unetr50_jml_bls": [68.13, 70.48, 70.60, 69.49, 69.93],
    }
    for experiment, values in folds.items():
        for fold, value in enumerate(values):
            _fabricate(tmp_path, Run(experiment, (f"dataset.fold={fold}",)), miou=value)
    table = load_tables()["14"]
    results = build_tables([table], tmp_path, tmp_path / "out", echo=lambda *_: None)["14"]
    by_row = {(tuple(r["labels"]), r["column"]): r for r in results}
    for labels, (mean, std) in {
        ("KD", "CE"): (66.40, 0.86),
        ("KD", "JML"): (67.62, 0.27),
        ("KD", "Diff"): (1.22, 0.59),
        ("BLS", "JML"): (69.73, 0.89),
    }.items():
        ours = by_row[(labels, "μ ± σ")]["ours"]
        # the printed folds are rounded to 0.01 and so is the paper's mean ± std of the unrounded ones: 0.01 apart
        assert ours["mean"] == pytest.approx(mean, abs=0.01) and ours["std"] == pytest.approx(std, abs=0.01)
        assert by_row[(labels, "μ ± σ")]["diff"] == pytest.approx(ours["mean"] - mean)
    assert by_row[(("KD", "Diff"), "0")]["ours"]["mean"] == pytest.approx(2.27)
    assert by_row[(("BLS", "CE"), "μ ± σ")]["ours"] is None  # no runs: nothing made up
    md = (tmp_path / "out" / "table14.md").read_text()
    assert "66.40 ± 0.86 (paper 66.40 ± 0.86, Δ +0.00)" in md


def test_table_builder_means_stds_missing_runs_and_latex(tmp_path):
    values = {"voc_dl3r18_jml_ce10": [70.0, 71.0, 75.0], "voc_dl3r18_jml": [74.0, 74.5, None]}
    for experiment, vals in values.items():
        for seed, v in enumerate(vals):
            if v is not None:
                _fabricate(tmp_path, Run(experiment, (f"seed={seed}",)), miou=v, acc=90.0)
    table = load_tables()["5"]
    results = build_tables([table], tmp_path, tmp_path / "out", echo=lambda *_: None)["5"]
    cell = next(r for r in results if r["labels"] == ["DL3-R18"] and r["column"] == "0.10/0.90")
    x = np.array([70.0, 71.0, 75.0])
    assert cell["ours"]["mean"] == pytest.approx(x.sum() / 3)
    assert cell["ours"]["std"] == pytest.approx(np.sqrt(((x - x.mean()) ** 2).sum() / 3))
    assert tuple(cell["paper"]) == (73.67, 0.39)
    partial = next(r for r in results if r["labels"] == ["DL3-R18"] and r["column"] == "0.25/0.75")
    assert (partial["ours"]["n"], partial["ours"]["expected"]) == (2, 3)
    md = (tmp_path / "out" / "table5.md").read_text()
    assert "74.25 ± 0.25 [2/3] (paper 74.42 ± 0.52, Δ -0.17)" in md
    assert "— (paper 79.80 ± 0.40)" in md  # DL3-R101 not run
    tex = (tmp_path / "out" / "table5.tex").read_text()
    header = next(line for line in tex.splitlines() if line.startswith("Model"))
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert all(line.count("&") == header.count("&") == 5 for line in rows)
    assert r"\begin{tabular}{lccccc}" in tex and r"$74.25 \pm 0.25$" in tex


def test_figure1_curves_have_the_papers_minima():
    for y in (0.1, 0.9):
        x, curves = figure1_curves(y)
        for name in ("CE", "JML-1", "JML-2"):
            assert x[np.argmin(curves[name])] == pytest.approx(y, abs=0.005), name
        assert curves["JML-1"].min() == pytest.approx(0.0, abs=1e-9)
        assert np.all(curves["JML-1"] <= curves["JML-2"] + 1e-12)  # Theorem H.2
    x, curves = figure1_curves(0.5)
    assert x[np.argmin(curves["SJL-L1"])] == pytest.approx(1.0, abs=0.005)  # not minimised at x = y


def test_smoke_pipeline_trains_skips_and_builds_tables_and_figures(tmp_path):
    """A reduced smoke grid through scripts/reproduce.py: teacher first, rerun skips, tables and figures."""
    spec = tmp_path / "tables.yaml"
    spec.write_text(
        '"T":\n  caption: tiny\n  header: [Model]\n  columns: [CE, JML-KD]\n  metrics: {miou: mIoU}\n'
        "  repeat: single\n  blocks:\n    - label: Tiny\n      experiments: [syn_tiny_ce, syn_tiny_jml_kd]\n"
        "fig5:\n  caption: eps\n  sweep:\n    figure: eps\n    experiments: {Tiny: syn_tiny_ce_bls}\n"
        "    eps: [0.5, 0.9]\n    kernel_size: [3]\n    repeat: single\n"
    )
    tiny = ["trainer.max_iters=2", "dataset.train.length=16", "dataset.val.length=4", "trainer.batch_size=2"]
    cmd = [
        sys.executable,
        "scripts/reproduce.py",
        "--results",
        str(spec),
        "--launcher",
        "inprocess",
        "--log-dir",
        str(tmp_path / "runs"),
        "--",
        *tiny,
    ]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "5 runs in 2 stage(s): 0 finished, 5 to run" in first.stdout
    dirname = override_dirname(["seed=0", *tiny])
    student = tmp_path / "runs" / "syn_tiny_jml_kd" / dirname
    teacher = tmp_path / "runs" / "syn_tiny_jml_bls_long" / dirname
    assert (student / "metrics.json").is_file() and (teacher / "checkpoints" / "last.pt").is_file()
    assert teacher.stat().st_mtime <= student.stat().st_mtime
    md = (tmp_path / "runs" / "reproduce" / "tables" / "tableT.md").read_text()
    miou = json.loads((student / "metrics.json").read_text())["miou"]
    assert f"{miou:.2f}" in md
    figures = tmp_path / "runs" / "reproduce" / "figures"
    assert {"figure1_loss_vs_prediction.png", "fig5.png"} <= {p.name for p in figures.iterdir()}
    assert (figures / "reliability" / "syn_tiny_ce.png").is_file()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "5 finished, 0 to run" in again.stdout


def test_smoke_grid_is_the_claims_check():
    tables = load_tables(SMOKE_RESULTS)
    columns = tables["S1"].columns
    assert columns == ["CE", "CE-BLS", "CE-KD", "JML", "JML-BLS", "JML-KD"]
    assert all(c.repeat == "seeds" for c in tables["S1"].blocks[0].cells)
    assert {t.key for t in tables.values() if t.is_figure} == {"fig4", "fig5"}
    grid = build_grid(list(tables.values()))
    assert [r.experiment for r in grid.stages[-1]] == ["syn_tiny_ce_kd"] * 3 + ["syn_tiny_jml_kd"] * 3


@pytest.mark.slow
def test_every_experiment_preset_trains_on_the_synthetic_set(tmp_path):
    """Each preset, its data set swapped for the synthetic one, trains 2 iterations (KD: from its own teacher)."""
    from segjml.reproduce.runner import run_inprocess

    swap = [
        "dataset=synthetic",
        "pretrained=false",
        "logger=none",
        "trainer.max_iters=2",
        "trainer.batch_size=2",
        "trainer.val_batch_size=2",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.device=cpu",
        "trainer.limit_val_samples=2",
        "dataset.train.length=8",
        "dataset.val.length=2",
    ]
    teachers = {teacher_of(e) for e in experiment_names()} - {None}
    for experiment in sorted(experiment_names(), key=lambda e: (teacher_of(e) is not None, e)):  # teachers first
        teacher = teacher_of(experiment)
        run = Run(experiment, ("seed=0",), Run(teacher, ("seed=0",)) if teacher else None)
        # semi-supervised presets: 2 of the 8 images labeled (the VOC ones name published split files)
        extra = [*swap, "dataset.labeled=0.25"] if experiment.startswith(("voc_dl3pr101_", "syn_ssl_")) else swap
        run_inprocess(run, tmp_path, extra)
        run_dir = run.run_dir(tmp_path, extra)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert 0 <= metrics["miou"] <= 100, experiment
        if experiment in teachers:  # keep last.pt for the students; large models' checkpoints fill a disk fast
            (run_dir / "checkpoints" / "best.pt").unlink(missing_ok=True)
        else:
            shutil.rmtree(run_dir)


@pytest.mark.slow
def test_hydra_launcher_sweeps_write_the_same_run_directories(tmp_path):
    """LAUNCHER=<hydra launcher> (here `basic`): the multirun sweeps land where the grid looks for them."""
    spec = tmp_path / "tables.yaml"
    spec.write_text(
        '"T":\n  caption: tiny\n  header: [Model]\n  columns: [CE, JML-KD]\n  metrics: {miou: mIoU}\n'
        "  repeat: seeds\n  blocks:\n    - label: Tiny\n"
        "      experiments: [syn_tiny_ce, syn_tiny_jml_kd]\n"
    )
    tiny = ["trainer.max_iters=2", "dataset.train.length=16", "dataset.val.length=4", "trainer.batch_size=2"]
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/reproduce.py",
            "--results",
            str(spec),
            "--launcher",
            "basic",
            "--log-dir",
            str(tmp_path / "runs"),
            "--",
            *tiny,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    grid = build_grid(list(load_tables(spec).values()))
    assert len(grid.runs) == 7
    for run in grid.runs:
        assert run.done(tmp_path / "runs", tiny), run
    # stage 1: syn_tiny_ce seeds 0-2 and the teacher's seed 0 (other seed lists: two sweeps); stage 2: the students
    assert proc.stdout.count("python train.py -m hydra/launcher=basic") == 3
