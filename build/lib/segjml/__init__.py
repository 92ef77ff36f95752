"""segjml: semantic segmentation with Jaccard metric losses (Wang, Ning & Blaschko, NeurIPS 2023).

The package is organised by concern: ``losses`` (the Jaccard metric losses and cross-entropy), ``labels`` (boundary
label smoothing, distillation targets), ``metrics`` (accuracy and calibration), ``models``, ``data``, ``engine``
(training, evaluation, checkpoints) and ``reproduce`` (the paper's tables). Importing ``segjml`` imports none of them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segjml")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"
