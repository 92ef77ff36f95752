#!/usr/bin/env python
"""Write Cityscapes ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignore) next to every ``*_gtFine_labelIds.png``.

Optional: the loader maps raw ids on the fly; precomputed train-id PNGs save that work. Existing files are kept.

Example:
    python scripts/prepare_cityscapes.py --root $SEGJML_DATA/cityscapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_count, write_png  # noqa: E402

from segjml.data.cityscapes import NUM_RAW_IDS, SPLIT_SIZES, raw_to_train_lut  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="directory holding gtFine/ and leftImg8bit/")
    parser.add_argument("--no-count-check", action="store_true", help="do not compare with 2975 train / 500 val")
    args = parser.parse_args()
    lut = raw_to_train_lut()
    status = 0
    for split, expected in SPLIT_SIZES.items():
        files = sorted((args.root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
        for path in tqdm(files, desc=f"{split} train ids"):
            out = path.with_name(path.name.replace("_labelIds.png", "_labelTrainIds.png"))
            if out.is_file():
                continue
            with Image.open(path) as img:
                raw = np.asarray(img)
            if raw.max(initial=0) >= NUM_RAW_IDS:
                sys.exit(f"error: {path} holds raw id {int(raw.max())}; Cityscapes labelIds are 0-{NUM_RAW_IDS - 1}")
            write_png(lut[raw], out)
        status |= check_count(f"{split} labels", len(files), None if args.no_count_check else expected)
    return status


if __name__ == "__main__":
    sys.exit(main())
