"""Scan a whole data set and report on it: ``python -m segjml.data.validate dataset=<name> [overrides] [options]``.

Takes the same overrides as ``train.py`` (``paths.data_dir=...``, ``dataset.root=...``, ``loss=...``). Every sample
of the train and val splits is decoded and checked (readable image, label values, image/label sizes); each problem is
printed on one line and the exit code is 1 if there is any (2 if a split cannot be read at all).

The same pass gathers the data report (:mod:`segjml.data.report`; docs/datasets.md, "The data report"): it is
printed as a table and written to ``data_report.json`` and ``class_frequencies.png`` in
``<paths.log_dir>/data_report/<dataset.name>_<time>/``. Options (not config keys):

- ``report_dir=<dir>``: write the report there instead;
- ``limit=<n>``: read only the first ``n`` samples of each split;
- ``reference_share=<x>``: the boundary share that stands for the paper's data sets (default
  :data:`~segjml.data.report.REFERENCE_SHARE`).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

OPTIONS = ("report_dir", "limit", "reference_share")


def sample_arrays(dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(H, W, 3)`` uint8 image and ``(H, W)`` label of a sample as stored: ``load`` of an on-disk data set
    (checked, may raise :class:`DataError`), the untransformed sample of a generated one."""
    if hasattr(dataset, "load"):
        return dataset.load(index)
    image, label = dataset[index]
    return image.permute(1, 2, 0).numpy(), label.numpy()


def scan(dataset, stats=None, limit: int | None = None) -> list[str]:
    """Messages of every sample of ``dataset`` (its first ``limit``) that fails to load; every other sample is added
    to ``stats`` (a :class:`~segjml.data.report.SplitStats`), if given."""
    from segjml.data.errors import DataError

    problems = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(n), desc=f"{type(dataset).__name__}/{dataset.split}", leave=False):
        try:
            image, label = sample_arrays(dataset, i)
        except DataError as err:
            problems.append(str(err))
            continue
        if stats is not None:
            stats.add(image, label)
    return problems


def split_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without this command's own ``key=value`` options (:data:`OPTIONS`), and those options."""
    overrides, options = [], {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in OPTIONS and value:
            options[key] = value
        else:
            overrides.append(arg)
    return overrides, options


def parse_options(options: dict[str, str]) -> tuple[int | None, float | None]:
    """``limit`` and ``reference_share`` as numbers; a ValueError with one line saying what is wrong."""
    limit = options.get("limit")
    if limit is not None and not (limit.isdigit() and int(limit) > 0):
        raise ValueError(f"limit={limit} must be a positive number of samples per split")
    share = options.get("reference_share")
    if share is not None:
        try:
            value = float(share)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 1:
            raise ValueError(f"reference_share={share} must be a boundary share in (0, 1]")
    return (int(limit) if limit else None), (value if share is not None else None)


def main(argv: list[str]) -> int:
    from segjml.config import compose
    from segjml.data.errors import DataError
    from segjml.data.loader import build_dataset, class_names_of
    from segjml.data.report import REFERENCE_SHARE, SplitStats, bls_settings, build_report, format_report, write_report

    overrides, options = split_options(argv)
    try:
        limit, reference_share = parse_options(options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = compose(overrides)
    bls = bls_settings(cfg)
    problems, total, stats, names = [], 0, {}, None
    for split in ("train", "val"):
        try:
            dataset = build_dataset(cfg.dataset, split, transform=False)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not hasattr(dataset, "load"):
            print(f"{cfg.dataset.name}/{split}: generated data set, nothing to scan (reported from its samples)")
        total += len(dataset) if limit is None else min(limit, len(dataset))
        names = names or class_names_of(dataset, cfg.dataset.num_classes)
        stats[split] = SplitStats(
            cfg.dataset.num_classes, cfg.dataset.ignore_index, bls["kernel_size"], bls["strict_ignore"]
        )
        problems += scan(dataset, stats[split], limit)
    for line in problems:
        print(f"bad: {line}")
    report = build_report(cfg, stats, names, bls, reference_share or REFERENCE_SHARE, limit)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = options.get("report_dir") or Path(cfg.paths.log_dir) / "data_report" / f"{cfg.dataset.name}_{stamp}"
    json_path, png_path = write_report(report, out_dir)
    print(format_report(report))
    print(f"data report: {json_path}, {png_path}")
    print(f"{cfg.dataset.name}: {total} samples scanned, {len(problems)} bad")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
