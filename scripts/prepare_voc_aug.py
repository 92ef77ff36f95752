#!/usr/bin/env python
"""Build PASCAL VOC's augmented training set (train_aug, 10582 images) from SBD.

Reads SBD's ``cls/<name>.mat`` (``GTcls.Segmentation``) and VOC's own ``SegmentationClass`` labels, writes index PNGs
to ``<voc-root>/SegmentationClassAug/`` and the list ``<voc-root>/ImageSets/Segmentation/train_aug.txt``:
(SBD train + SBD val + VOC train) minus VOC val. Files already written are kept (the script can be rerun).

Example:
    python scripts/prepare_voc_aug.py --voc-root $SEGJML_DATA/VOCdevkit/VOC2012 \\
        --sbd-root /path/benchmark_RELEASE/dataset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

try:
    import scipy.io
except ImportError:  # an optional dependency: only this script reads .mat files
    print("error: this script reads SBD's .mat files with SciPy: pip install 'segjml[prepare]'", file=sys.stderr)
    sys.exit(2)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_count, write_png  # noqa: E402

from segjml.data.voc import voc_palette  # noqa: E402


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        sys.exit(f"error: {path} is missing")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def sbd_label(path: Path) -> np.ndarray:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc-root", type=Path, required=True, help="VOCdevkit/VOC2012")
    parser.add_argument(
        "--sbd-root", type=Path, required=True, help="SBD's dataset/ directory (cls/, train.txt, val.txt)"
    )
    parser.add_argument("--expected-count", type=int, default=10582, help="images expected in train_aug (0: no check)")
    args = parser.parse_args()
    sets = args.voc_root / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_list(sets / "train.txt"), set(read_list(sets / "val.txt"))
    sbd_names = read_list(args.sbd_root / "train.txt") + read_list(args.sbd_root / "val.txt")
    names = sorted((set(sbd_names) | set(voc_train)) - voc_val)
    out_dir = args.voc_root / "SegmentationClassAug"
    palette = voc_palette(256)
    sbd_set = set(sbd_names)
    for name in tqdm(names, desc="train_aug labels"):
        out = out_dir / f"{name}.png"
        if out.is_file():
            continue
        if name in sbd_set:
            mat = args.sbd_root / "cls" / f"{name}.mat"
            if not mat.is_file():
                sys.exit(f"error: {mat} is missing")
            label = sbd_label(mat)
        else:
            with Image.open(args.voc_root / "SegmentationClass" / f"{name}.png") as img:
                label = np.asarray(img)
        write_png(label, out, palette)
    (sets / "train_aug.txt").write_text("\n".join(names) + "\n")
    return check_count("train_aug images", len(names), args.expected_count or None)


if __name__ == "__main__":
    sys.exit(main())
