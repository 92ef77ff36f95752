"""Entry points shared by ``train.py`` and the ``segjml-train`` console script."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

log = logging.getLogger("segjml")


class UserError(Exception):
    """A problem with the user's input (config, data, weights, checkpoint) reported as one line."""


def run_training(cfg: DictConfig) -> float:
    """Train from a composed config; input errors end the process with one line and exit code 2."""
    from segjml.data.errors import DataError
    from segjml.engine import train
    from segjml.engine.checkpoint import CheckpointError
    from segjml.engine.distillation import TeacherError
    from segjml.models import PretrainedWeightsError

    try:
        return train(cfg).get("miou", float("nan"))
    except (UserError, DataError, CheckpointError, PretrainedWeightsError, TeacherError, FloatingPointError,
            ValueError) as err:
        _save_traceback(cfg)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_evaluation(cfg: DictConfig) -> float:
    """``eval.py``: evaluate a checkpoint; input errors end the process with one line and exit code 2."""
    from segjml.engine.inference import evaluate_checkpoint

    return _guarded(cfg, lambda: evaluate_checkpoint(cfg)["miou"])


def run_prediction(cfg: DictConfig) -> None:
    """``predict.py``: write colour-coded predictions; input errors end the process with one line and exit code 2."""
    from segjml.engine.inference import predict_images

    _guarded(cfg, lambda: predict_images(cfg))


def _guarded(cfg: DictConfig, fn):
    from segjml.data.errors import DataError
    from segjml.engine.checkpoint import CheckpointError
    from segjml.models import PretrainedWeightsError

    try:
        return fn()
    except (UserError, DataError, CheckpointError, PretrainedWeightsError, ValueError) as err:
        _save_traceback(cfg)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _save_traceback(cfg: DictConfig) -> None:
    """Keep the full traceback in the run directory (the console gets the one-line cause)."""
    import traceback
    from pathlib import Path

    try:
        path = Path(cfg.paths.output_dir) / "error.log"
        path.write_text(traceback.format_exc())
    except Exception:  # the run directory itself may be the problem; the one-line message still goes out
        pass


def train_main() -> None:
    """``segjml-train``: the same as ``python train.py`` with the configs shipped next to the package."""
    from pathlib import Path

    import hydra

    import segjml.config  # noqa: F401

    config_dir = str(Path(__file__).resolve().parent.parent / "configs")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="train")(run_training)()
