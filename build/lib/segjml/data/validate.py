"""Scan a whole data set and list every bad file: ``python -m segjml.data.validate dataset=<name> [overrides]``.

Takes the same overrides as ``train.py`` (``paths.data_dir=...``, ``dataset.root=...``). Every sample of the train
and val splits is decoded and checked (readable image, label values, image/label sizes); each problem is printed on
one line and the exit code is 1 if there is any.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def scan(dataset) -> list[str]:
    """Messages of every sample of ``dataset`` that fails to load."""
    from segjml.data.errors import DataError

    problems = []
    for i in tqdm(range(len(dataset)), desc=f"{type(dataset).__name__}/{dataset.split}", leave=False):
        try:
            dataset.load(i)
        except DataError as err:
            problems.append(str(err))
    return problems


def main(argv: list[str]) -> int:
    from segjml.config import compose
    from segjml.data.errors import DataError
    from segjml.data.loader import build_dataset

    cfg = compose(argv)
    problems, total = [], 0
    for split in ("train", "val"):
        try:
            dataset = build_dataset(cfg.dataset, split, transform=False)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not hasattr(dataset, "load"):
            print(f"{cfg.dataset.name}/{split}: generated data set, nothing to scan")
            continue
        total += len(dataset)
        problems += scan(dataset)
    for line in problems:
        print(f"bad: {line}")
    print(f"{cfg.dataset.name}: {total} samples scanned, {len(problems)} bad")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
