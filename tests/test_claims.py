"""The claims check (`make claims`): its grid, the paired statistics, the verdicts, the report, parallel runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segjml.reproduce import runner
from segjml.reproduce.claims import (
    CLAIMS,
    CLAIMS_RESULTS,
    Check,
    Claim,
    Paired,
    better,
    contrast,
    gains_more,
    judge,
    render,
    worse,
)
from segjml.reproduce.grid import build_grid, load_tables
from tests.helpers import ROOT, compose_config

COLUMNS = ["CE", "CE-BLS", "CE-KD", "JML", "JML-BLS", "JML-KD"]


def test_claims_grid_is_the_demo_recipe_for_six_losses_three_seeds_and_two_eps_sweeps():
    tables = load_tables(CLAIMS_RESULTS)
    main = tables["C1"]
    assert main.columns == COLUMNS
    assert [c.repeat for c in main.blocks[0].cells] == ["seeds"] * 6
    grid = build_grid(list(tables.values()))
    # stage 1: 4 hard/BLS columns x 3 seeds + teacher + 5 eps points x 3 seeds + 3 SSL columns x 3 seeds;
    # stage 2: the KD students
    assert [len(s) for s in grid.stages] == [4 * 3 + 1 + 5 * 3 + 3 * 3, 6]
    assert tables["C2"].columns == ["Supervised", "CE-SSL", "JML-SSL"]
    assert [c.experiment for c in tables["C2"].blocks[0].cells] == ["syn_ssl_sup", "syn_ssl_cessl", "syn_ssl_jmlssl"]
    assert {r.experiment for r in grid.stages[1]} == {"claims_ce_kd", "claims_jml_kd"}
    assert {str(r.teacher) for r in grid.stages[1]} == {"claims_teacher seed=0"}
    sweeps = [r for r in grid.runs if any(o.startswith("loss.bls") for o in r.overrides)]
    assert {o for r in sweeps for o in r.overrides if o.startswith("loss.bls.kernel_size")} == {
        "loss.bls.kernel_size=inf"
    }
    assert len(sweeps) == 5 * 3  # k = 3: eps 0.1, 0.25 (0.5 is the preset); k = inf: 0.05, 0.1, 0.25
    for exp in ["claims_ce", "claims_jml_bls", "claims_jml_kd"]:
        cfg = compose_config([f"experiment={exp}"])
        assert cfg.model == compose_config(["experiment=demo"]).model
        assert (cfg.trainer.max_iters, cfg.optimizer.lr, cfg.trainer.batch_size) == (600, 0.02, 8)
    assert compose_config(["experiment=claims_teacher"]).trainer.max_iters == 1200


def test_paired_statistics_by_hand():
    p = Paired.of([1.0, 2.0, 3.0])
    assert (p.mean, p.n) == (2.0, 3)
    assert p.se == pytest.approx(1.0 / math.sqrt(3))  # sample std 1, over sqrt(3)
    assert p.clear  # 2 > 2 * 0.577
    assert not Paired.of([-1.0, 2.0, 3.0]).clear  # mean 4/3, sample std 2.08, se 1.20: 1.33 < 2.40
    assert str(Paired.of([1.0, 2.0, 3.0])) == "+2.00 ± 0.58*"
    assert Paired.of([math.nan]) is None


def _values(**columns):
    """``values[column][metric]`` with every column defaulting to zeros (3 seeds)."""
    values = {c: {m: [0.0, 0.0, 0.0] for m in ("acc", "miou", "ece", "bece", "sce")} for c in COLUMNS}
    for key, per_seed in columns.items():
        column, metric = key.split("__")
        values[column.replace("_", "-")][metric] = per_seed
    return values


def test_checks_follow_each_metric_direction():
    values = _values(JML__miou=[3.0, 4.0, 5.0], JML__ece=[1.0, 1.5, 2.0])
    assert contrast(values, better("miou", "JML", "CE")).mean == pytest.approx(4.0)
    assert better("miou", "JML", "CE").sign == 1 and better("ece", "JML", "CE").sign == -1
    assert worse("ece", "JML", "CE").sign == 1
    # (JML-BLS - JML) - (CE-BLS - CE) per seed: (1 - 3) - (2 - 0) = -4, (2 - 4) - (2 - 0) = -4, (3 - 5) - 2 = -4
    values = _values(
        JML_BLS__miou=[1.0, 2.0, 3.0], JML__miou=[3.0, 4.0, 5.0], CE_BLS__miou=[2.0, 2.0, 2.0], CE__miou=[0.0] * 3
    )
    assert contrast(values, gains_more("miou", "JML-BLS", "JML", "CE-BLS", "CE")).mean == pytest.approx(-4.0)
    assert better("miou", "JML", "CE").text() == "miou: JML - CE > 0"


def test_verdicts_reproduced_direction_only_not_reproduced_and_sometimes():
    clear_gain = _values(JML__miou=[3.0, 4.0, 5.0], JML__acc=[1.0, 1.2, 1.4])
    claim = Claim("x", (better("miou", "JML", "CE"), better("acc", "JML", "CE")))
    assert judge(clear_gain, claim)[0] == "reproduced"
    noisy = _values(JML__miou=[3.0, 4.0, 5.0], JML__acc=[-1.0, 2.0, 3.0])
    assert judge(noisy, claim)[0] == "direction only"
    opposite = _values(JML__miou=[3.0, 4.0, 5.0], JML__acc=[-1.0, -1.2, -1.4])
    assert judge(opposite, claim)[0] == "not reproduced"
    sometimes = Claim("y", (worse("ece", "CE-BLS", "CE"), worse("ece", "CE-KD", "CE")), any_of=True)
    one_hurts = _values(CE_BLS__ece=[0.5, 0.6, 0.7], CE_KD__ece=[-0.5, -0.6, -0.7])
    assert judge(one_hurts, sometimes)[0] == "reproduced"
    assert judge(_values(CE_BLS__ece=[-0.5, -0.6, -0.7]), sometimes)[0] == "not reproduced"


def test_every_paper_claim_names_known_columns_and_metrics():
    metrics = set(load_tables(CLAIMS_RESULTS)["C1"].metrics)
    for claim in CLAIMS:
        for check in claim.checks:
            assert check.metric in metrics
            assert {c for c, _ in check.terms} <= set(COLUMNS) | {"Supervised", "CE-SSL", "JML-SSL"}
            assert sum(coef for _, coef in check.terms) == 0  # a contrast: differences of columns only
    assert any(c.any_of for c in CLAIMS)  # "sometimes hurt calibration"


def _write_metrics(run_dir: Path, **metrics) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_report_from_finished_runs(tmp_path):
    """Fabricated metrics.json files in the grid's run directories: the report's numbers and verdicts by hand."""
    tables = load_tables(CLAIMS_RESULTS)
    base = {"acc": 90.0, "miou_i": 60.0, "miou_c": 55.0, "bece": 20.0, "sce": 1.0, "bsce": 8.0}
    miou = {"claims_ce": 70.0, "claims_jml": 80.0, "syn_ssl_sup": 50.0, "syn_ssl_jmlssl": 77.0}
    for run in build_grid(list(tables.values())).runs:
        seed = int(dict(o.split("=", 1) for o in run.overrides)["seed"])
        m = miou.get(run.experiment, 75.0) + seed  # every column: +0, +1, +2 over the seeds
        ece = 3.0 if run.experiment == "claims_jml" else 2.0
        _write_metrics(run.run_dir(tmp_path), miou=m, ece=ece, **base)
    report = render(tables, tmp_path)
    assert "| CE | 90.00 ± 0.00 | 71.00 ± 0.82 |" in report  # mean of 70, 71, 72; population std sqrt(2/3)
    assert "| JML − CE | +0.00 ± 0.00 | +10.00 ± 0.00* |" in report
    assert "- **reproduced**: JML compromises calibration (ECE)" in report  # 3.0 vs 2.0 on every seed
    # JML-BLS (75) is below JML (80) on every seed: BLS does not improve JML's accuracy
    assert "- **not reproduced**: Both BLS and KD consistently improve" in report
    assert "| JML-SSL − CE-SSL | +0.00 ± 0.00 | +2.00 ± 0.00* |" in report  # 77 vs 75 on every seed
    assert "- **reproduced**: JML-SSL improves over CE-SSL (AugSeg)" in report
    assert "| inf | 0.1 |" in report and "(-5.00 ± 0.00*)" in report  # the k = inf sweep point against JML


def test_local_launcher_runs_jobs_side_by_side_with_a_share_of_the_threads(tmp_path, monkeypatch):
    """jobs=2: two runs of a stage overlap in time, each process sees OMP_NUM_THREADS = cores // 2."""
    script = (
        "import json, os, sys, time; d = sys.argv[1]; os.makedirs(d, exist_ok=True); t0 = time.time(); "
        "time.sleep(1.0); json.dump({'start': t0, 'end': time.time(), 'omp': os.environ.get('OMP_NUM_THREADS')}, "
        "open(os.path.join(d, 'metrics.json'), 'w'))"
    )
    monkeypatch.setattr(
        runner, "local_command", lambda run, log_dir, extra: [sys.executable, "-c", script, str(run.run_dir(log_dir))]
    )
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    tables = load_tables(CLAIMS_RESULTS)
    grid = build_grid([tables["C1"]])
    grid.stages = [grid.stages[0][:4]]  # four runs of one stage
    t0 = time.perf_counter()
    failed = runner.execute(grid, "local", tmp_path, jobs=2, echo=lambda *_: None)
    elapsed = time.perf_counter() - t0
    assert failed == []
    done = [json.loads((r.run_dir(tmp_path) / "metrics.json").read_text()) for r in grid.stages[0]]
    assert {d["omp"] for d in done} == {"1"}
    assert done[1]["start"] < done[0]["end"]  # the second run started before the first ended
    assert elapsed < 3.5  # four 1 s runs, two at a time (one after the other: > 4 s)


def test_jobs_need_the_local_launcher():
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--claims", "--launcher", "inprocess", "--jobs", "2", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: jobs=2: use a positive number, and more than 1 only with the local launcher"


def test_claims_dry_run_lists_every_run_with_its_command():
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--claims", "--dry-run", "--jobs", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "# 43 runs in 2 stage(s)" in proc.stdout
    assert "python train.py experiment=claims_jml_bls loss.bls.eps=0.05 loss.bls.kernel_size=inf seed=2" in proc.stdout
    assert "\"teacher.checkpoint='outputs/claims/claims_teacher/seed=0/checkpoints/last.pt'\"" in proc.stdout


def test_check_text_is_readable():
    check = Check("miou", (("JML-BLS", 1), ("JML", -1), ("CE-BLS", -1), ("CE", 1)), 1)
    assert check.text() == "miou: JML-BLS - JML - CE-BLS + CE > 0"


def test_boundary_share_of_a_hand_drawn_map():
    """A 2x2 square of class 1 in a 6x6 background, one ignored pixel far from it: k = 3 boundary by hand."""
    from segjml.reproduce.claims import boundary_share

    label = torch.zeros(1, 6, 6, dtype=torch.long)
    label[0, 2:4, 2:4] = 1
    label[0, 5, 5] = 255
    # boundary: the 4 square pixels and the 12 background pixels of the ring around them (rows/cols 1..4)
    assert boundary_share(label) == pytest.approx(16 / 35)
