#!/usr/bin/env python
"""Gather every run's ``metrics.json`` into the paper's tables (Markdown and LaTeX) with the paper's numbers.

    python scripts/make_tables.py [--tables all|2,4] [--log-dir outputs] [--out DIR] [--smoke] [-- overrides]

Each cell shows our mean ± std over its runs (seeds 0-2, or DeepGlobe folds), ``[n/k]`` when only n of k runs have
finished, and the paper's value with the difference. The paper's numbers come from
``segjml/reproduce/paper_results.yaml``. Pass the same extra overrides as to ``scripts/reproduce.py``, if any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segjml.reproduce.grid import PAPER_RESULTS, SMOKE_RESULTS, GridError, load_tables, select_tables  # noqa: E402
from segjml.reproduce.tables import build_tables  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tables", default="all")
    parser.add_argument("--log-dir", default=None, help="where runs live (default: outputs, or outputs/smoke)")
    parser.add_argument("--out", default=None, help="output folder (default: <log_dir>/reproduce/tables)")
    parser.add_argument("--smoke", action="store_true", help="the synthetic smoke tables")
    parser.add_argument("--results", default=None, help="a tables file other than paper_results.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    log_dir = Path(args.log_dir or ("outputs/smoke" if args.smoke else "outputs"))
    source = Path(args.results) if args.results else SMOKE_RESULTS if args.smoke else PAPER_RESULTS
    try:
        tables = select_tables(load_tables(source), args.tables)
    except (GridError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    build_tables(tables, log_dir, Path(args.out) if args.out else log_dir / "reproduce" / "tables", args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
