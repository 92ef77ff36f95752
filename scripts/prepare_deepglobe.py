#!/usr/bin/env python
"""Convert DeepGlobe Land RGB masks (``<id>_mask.png``) into index PNGs (``<id>_label.png``: classes 0-5, 255 unknown).

Optional: the loader decodes RGB masks on the fly; index PNGs are smaller and faster. Existing files are kept.

Example:
    python scripts/prepare_deepglobe.py --root $SEGJML_DATA/deepglobe
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_count, write_png  # noqa: E402

from segjml.data.deepglobe import NUM_IMAGES, DeepGlobeLand  # noqa: E402
from segjml.data.errors import DataError  # noqa: E402
from segjml.data.folder import read_label  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="directory holding land/train/")
    parser.add_argument("--no-count-check", action="store_true", help=f"do not compare with {NUM_IMAGES} images")
    args = parser.parse_args()
    masks = sorted((args.root / "land" / "train").glob("*_mask.png"))
    decoder = DeepGlobeLand.__new__(DeepGlobeLand)  # only the colour decoding is needed
    for path in tqdm(masks, desc="index masks"):
        out = path.with_name(path.name.replace("_mask.png", "_label.png"))
        if out.is_file():
            continue
        try:
            write_png(decoder.decode_label(read_label(path, "rgb"), path), out)
        except DataError as err:
            sys.exit(f"error: {err}")
    return check_count("land-cover masks", len(masks), None if args.no_count_check else NUM_IMAGES)


if __name__ == "__main__":
    sys.exit(main())
