#!/usr/bin/env python
"""Train the grid of the paper's tables and figures, then build the tables and figures.

    python scripts/reproduce.py [--tables 2,4|all] [--launcher local|inprocess|submitit_slurm|...] [--dry-run]
                                [--smoke | --claims] [--jobs N] [--log-dir outputs] [-- extra overrides for every run]

Every table cell trains its experiment preset for seeds 0, 1, 2 (DeepGlobe: folds 0-4); KD teachers (seed 0, or the
same fold) train first; a run whose ``metrics.json`` exists is skipped, so rerunning the command resumes the grid
(an interrupted run also resumes from its own ``checkpoints/last.pt``). ``--dry-run`` lists every run with its
command line. ``--smoke`` runs the synthetic-data grid of ``segjml/reproduce/smoke_results.yaml`` instead;
``--claims`` the claims check of ``segjml/reproduce/claims_results.yaml`` (``make claims``), which also writes
``<log_dir>/reproduce/claims.md``: the paper's claims, each marked reproduced or not at the demo's scale.
Tables go to ``<log_dir>/reproduce/tables`` (Markdown, LaTeX, results.json), figures to ``.../figures``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segjml.reproduce.grid import PAPER_RESULTS, SMOKE_RESULTS, GridError, build_grid, load_tables, select_tables  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--tables", default="all", help="comma list of tables / figures (1,2,...,15,fig4,fig5) or all")
    parser.add_argument(
        "--launcher",
        default="local",
        help="local (one process per run), inprocess, or a Hydra launcher (submitit_slurm, ...)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list every run and its command line; train nothing")
    grids = parser.add_mutually_exclusive_group()
    grids.add_argument("--smoke", action="store_true", help="the synthetic-data smoke grid (CPU, minutes)")
    grids.add_argument("--claims", action="store_true", help="the claims check on the synthetic set (CPU, < 40 min)")
    parser.add_argument("--jobs", type=int, default=1, help="local launcher: runs trained side by side (default 1)")
    parser.add_argument("--log-dir", default=None, help="where runs live (default: outputs, or outputs/smoke)")
    parser.add_argument("--results", default=None, help="a tables file other than the paper's (or the smoke one)")
    parser.add_argument("--no-train", action="store_true", help="only rebuild the tables and figures")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cwd = Path.cwd()
    log_dir = Path(args.log_dir or ("outputs/smoke" if args.smoke else "outputs/claims" if args.claims else "outputs"))
    if log_dir.is_absolute() or cwd != ROOT:
        log_dir = (cwd / log_dir).resolve()
        log_dir = log_dir.relative_to(ROOT) if log_dir.is_relative_to(ROOT) else log_dir
    os.chdir(ROOT)  # train.py's relative paths (outputs, data) are those of the repository root
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from segjml.reproduce.claims import CLAIMS_RESULTS, write_report
    from segjml.reproduce.figures import build_figures
    from segjml.reproduce.runner import execute
    from segjml.reproduce.tables import build_tables

    try:
        default = SMOKE_RESULTS if args.smoke else CLAIMS_RESULTS if args.claims else PAPER_RESULTS
        source = Path(args.results) if args.results else default
        tables = select_tables(load_tables(source), args.tables)
        grid = build_grid(tables)
    except (GridError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = []
    if not args.no_train:
        try:
            failed = execute(grid, args.launcher, log_dir, args.overrides, dry_run=args.dry_run, jobs=args.jobs)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.dry_run:
        return 0
    out = log_dir / "reproduce"
    build_tables(tables, log_dir, out / "tables", args.overrides)
    build_figures(tables, log_dir, out / "figures", args.overrides)
    if args.claims:
        report = write_report({t.key: t for t in tables}, log_dir, out / "claims.md", args.overrides)
        print(report.read_text())
        print(f"# claims report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
