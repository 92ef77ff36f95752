"""Semi-supervised segmentation with Jaccard metric losses (JML-SSL, paper Appendix I) on AugSeg's pipeline.

``ema`` (the mean teacher), ``splits`` (labeled / unlabeled images), ``augment`` (strong intensity augmentation,
adaptive CutMix), ``losses`` (eq. 62-64). ``docs/ssl.md`` describes how they fit together.
"""

from segjml.ssl.augment import CutMixBatch, adaptive_cutmix, image_confidence, strong_intensity_augment
from segjml.ssl.ema import EMATeacher
from segjml.ssl.losses import SSLLoss
from segjml.ssl.splits import labeled_indices, read_split_file, split_size, unlabeled_indices

__all__ = [
    "CutMixBatch",
    "EMATeacher",
    "SSLLoss",
    "adaptive_cutmix",
    "image_confidence",
    "labeled_indices",
    "read_split_file",
    "split_size",
    "strong_intensity_augment",
    "unlabeled_indices",
]
