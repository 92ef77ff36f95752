"""segjml: semantic segmentation with Jaccard metric losses (Wang, Ning & Blaschko, NeurIPS 2023).

The package is organised by concern: ``losses`` (the Jaccard metric losses and cross-entropy), ``labels`` (boundary
label smoothing, distillation targets), ``metrics`` (accuracy and calibration), ``models``, ``data``, ``engine``
(training, evaluation, checkpoints) and ``reproduce`` (the paper's tables). Importing ``segjml`` imports none of them;
``segjml.Segmenter`` (a trained checkpoint as a Python callable, docs/inference.md) is imported on first use.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segjml")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # `segjml.Segmenter` is imported on first use, so that `import segjml` stays light (no torch).
    if name == "Segmenter":
        from segjml.engine.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'segjml' has no attribute {name!r}")
