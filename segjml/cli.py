"""The commands ``segjml-train`` / ``segjml-eval`` / ``segjml-predict`` (and ``train.py`` / ``eval.py`` /
``predict.py`` in a checkout, which call the same functions).

Each composes its config from the configs shipped in the package and runs under :func:`guarded`: an input error (a
bad value, a missing file, a checkpoint that does not fit) ends the process with one line on stderr and exit code 2,
and its traceback goes to ``error.log`` in the run directory. ``docs/errors.md`` lists the inputs that are handled.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger("segjml")


class UserError(Exception):
    """A problem with the user's input (config, data, weights, checkpoint) reported as one line."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong" (every other exception is a bug and keeps its traceback)."""
    from segjml.data.errors import DataError
    from segjml.engine.checkpoint import CheckpointError
    from segjml.engine.distillation import TeacherError
    from segjml.engine.stopping import RunLockedError
    from segjml.models import PretrainedWeightsError

    return (
        UserError,
        DataError,
        CheckpointError,
        PretrainedWeightsError,
        TeacherError,
        RunLockedError,
        FloatingPointError,
        ValueError,
        MissingMandatoryValue,
    )


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error raised in a DataLoader worker arrives as "Caught X in DataLoader
    worker process N. Original Traceback ...": its own message is the last line of that text."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, MissingMandatoryValue) and lines:  # "Missing mandatory value: ckpt" + OmegaConf's key details
        return f"{lines[0]}; give it on the command line ({lines[0].rsplit(' ', 1)[-1]}=...)"
    return " ".join(lines) or type(err).__name__


def guarded(cfg: DictConfig, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; an input error becomes ``error: <one line>`` on stderr and exit code 2."""
    try:
        return fn()
    except user_errors() as err:
        _save_traceback(cfg)
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def _save_traceback(cfg: DictConfig) -> None:
    """Keep the full traceback in the run directory (the console gets the one-line cause)."""
    try:
        path = Path(cfg.paths.output_dir) / "error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except Exception:  # the run directory itself may be the problem (disk full); the one-line message still goes out
        pass


INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT)


def run_training(cfg: DictConfig) -> float:
    """Train from a composed config; returns the final mIoU (what a Hydra sweeper optimises).

    Ctrl-C saves ``last.pt`` at the next iteration boundary and ends the process with code 130; a second Ctrl-C ends
    it at once, without saving.
    """
    from segjml.engine import train

    try:
        result = guarded(cfg, lambda: train(cfg))
    except KeyboardInterrupt:
        _save_traceback(cfg)
        print("error: interrupted twice: stopped at once, without saving", file=sys.stderr)
        sys.exit(INTERRUPTED)
    if result.get("signal") == "SIGINT":  # the trainer has logged "interrupted at iteration N: saved ..."
        sys.exit(INTERRUPTED)
    return result.get("miou", float("nan"))


def run_evaluation(cfg: DictConfig) -> float:
    """Evaluate a checkpoint (``eval`` config); returns its mIoU."""
    from segjml.engine.commands import evaluate_checkpoint

    return guarded(cfg, lambda: evaluate_checkpoint(cfg)["miou"])


def run_prediction(cfg: DictConfig) -> None:
    """Write colour-coded predictions of images (``predict`` config)."""
    from segjml.engine.commands import predict_images

    guarded(cfg, lambda: predict_images(cfg))


def _hydra_main(config_name: str, task: Callable[[DictConfig], Any]) -> Any:
    import hydra

    from segjml.config import CONFIG_DIR

    return hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(task)()


def train_main() -> None:
    """``segjml-train [key=value ...]`` (= ``python train.py``)."""
    _hydra_main("train", run_training)


def eval_main() -> None:
    """``segjml-eval ckpt=<path> [...]`` (= ``python eval.py``)."""
    _hydra_main("eval", run_evaluation)


def predict_main() -> None:
    """``segjml-predict ckpt=<path> inputs=<dir or glob>`` (= ``python predict.py``)."""
    _hydra_main("predict", run_prediction)
