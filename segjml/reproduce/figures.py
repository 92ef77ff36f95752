"""The paper's figures from our code and runs.

- Figure 1: loss value against the prediction x of one class for a soft label y = 0.1 and y = 0.9: CE (with the soft
  target) against JML-1, JML-2, SJL-L1 and SJL-L2, computed with segjml's own loss kernel.
- Figures 4 and 5 (``figure: kernel`` / ``figure: eps`` sweeps): the best eps and its mIoU for each BLS kernel size,
  and mIoU / ECE against eps, mean +- std over seeds.
- The evaluator's reliability diagrams of the table runs (seed 0 / fold 0), collected in one folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segjml.losses._functional import jaccard_from_statistics  # noqa: E402
from segjml.reproduce.grid import Table, cell_runs, repeat_overrides, sweep_point_runs, with_teacher  # noqa: E402
from segjml.reproduce.tables import Stat, run_values  # noqa: E402


def figure1_curves(y: float, steps: int = 1000) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Loss against the prediction ``x`` in (0, 1), on a grid of step ``1 / steps``, for the soft label ``y`` (one
    pixel, one class, no smoothing)."""
    x = torch.linspace(0, 1, steps + 1, dtype=torch.float64)[1:-1]
    yt = torch.full_like(x, y)
    stats = {"sx": x, "sy": yt, "diff": (x - yt).abs(), "inner": x * yt, "sx2": x * x, "sy2": yt * yt}
    curves = {"CE": -(yt * x.log() + (1 - yt) * (1 - x).log())}
    for name, variant in (("JML-1", "jml1"), ("JML-2", "jml2"), ("SJL-L1", "sjl_l1"), ("SJL-L2", "sjl_l2")):
        curves[name] = jaccard_from_statistics(stats, variant=variant, smooth=0.0)
    return x.numpy(), {k: v.numpy() for k, v in curves.items()}


def figure1(path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, y in zip(axes, (0.1, 0.9)):
        x, curves = figure1_curves(y)
        for name, values in curves.items():
            ax.plot(x, values, label=name, lw=1.6, ls="--" if name.startswith("SJL") else "-")
        ax.axvline(y, color="gray", lw=0.8, ls=":")
        ax.set(title=f"y = {y}", xlabel="prediction x", ylabel="loss", ylim=(0, 2.5))
    axes[0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _stats(runs, metric: str, log_dir: Path, extra: Sequence[str]) -> Stat | None:
    return Stat.of(run_values(runs, metric, log_dir, extra), len(runs))


def sweep_figure(table: Table, log_dir: Path, path: Path, extra: Sequence[str] = ()) -> Path | None:
    sweep = table.sweep
    if sweep["figure"] == "eps":
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for model, experiment in sweep["experiments"].items():
            k = sweep["kernel_size"][0]
            xs, stats = [], []
            baseline = (sweep.get("baseline") or {}).get(model)
            if baseline:
                xs.append(0.0)
                runs = cell_runs(baseline, sweep.get("repeat", "seeds"))
                stats.append({m: _stats(runs, m, log_dir, extra) for m in ("miou", "ece")})
            for eps in sweep["eps"]:
                xs.append(float(eps))
                runs = sweep_point_runs(experiment, sweep, eps, k)
                stats.append({m: _stats(runs, m, log_dir, extra) for m in ("miou", "ece")})
            for ax, metric in zip(axes, ("miou", "ece")):
                pts = [(x, s[metric]) for x, s in zip(xs, stats) if s[metric] is not None]
                if pts:
                    px = np.array([p[0] for p in pts])
                    mean = np.array([p[1].mean for p in pts])
                    std = np.array([p[1].std for p in pts])
                    ax.errorbar(px, mean, yerr=std, marker="o", capsize=3, label=model)
        axes[0].set(xlabel="ε", ylabel="mIoU (%)")
        axes[1].set(xlabel="ε", ylabel="ECE (%)")
        axes[0].legend(frameon=False)
    else:  # kernel: best eps and its mIoU per kernel size
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for model, experiment in sweep["experiments"].items():
            labels, best_eps, best_miou, best_std = [], [], [], []
            for k in sweep["kernel_size"]:
                candidates = []
                for eps in sweep["eps"]:
                    s = _stats(sweep_point_runs(experiment, sweep, eps, k), "miou", log_dir, extra)
                    if s is not None:
                        candidates.append((s.mean, float(eps), s.std))
                if candidates:
                    mean, eps, std = max(candidates)
                    labels.append("∞" if str(k).lower() in ("inf", "infinity") else str(k))
                    best_eps.append(eps)
                    best_miou.append(mean)
                    best_std.append(std)
            pos = np.arange(len(labels))
            axes[0].plot(pos, best_eps, marker="o", label=model)
            axes[1].errorbar(pos, best_miou, yerr=best_std, marker="o", capsize=3, label=model)
            for ax in axes:
                ax.set_xticks(pos, labels)
        axes[0].set(xlabel="kernel size k", ylabel="best ε")
        axes[1].set(xlabel="kernel size k", ylabel="mIoU (%) at the best ε")
        axes[0].legend(frameon=False)
    fig.suptitle(table.caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def collect_reliability(tables: Sequence[Table], log_dir: Path, out_dir: Path, extra: Sequence[str] = ()) -> int:
    """Copy the reliability diagram of each table cell's first run to ``out_dir/<experiment>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = 0
    for table in tables:
        for block in table.blocks:
            for cell in block.cells:
                if cell.experiment is None:
                    continue
                first = with_teacher(cell.experiment, repeat_overrides(cell.repeat)[0])
                src = first.run_dir(log_dir, extra) / "reliability.png"
                dst = out_dir / f"{cell.experiment}.png"
                if src.is_file() and not dst.exists():
                    shutil.copyfile(src, dst)
                    copied += 1
    return copied


def build_figures(
    tables: Sequence[Table], log_dir: Path, out_dir: Path, extra: Sequence[str] = (), echo=print
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [figure1(out_dir / "figure1_loss_vs_prediction.png")]
    for table in tables:
        if table.is_figure:
            path = sweep_figure(table, log_dir, out_dir / f"{table.key}.png", extra)
            if path is not None:
                written.append(path)
    n = collect_reliability([t for t in tables if not t.is_figure], log_dir, out_dir / "reliability", extra)
    echo(f"# figures written to {out_dir}: {', '.join(p.name for p in written)} and {n} reliability diagrams")
    return written
