"""The commands ``segjml-train`` / ``segjml-eval`` / ``segjml-predict`` / ``segjml-export`` (and ``train.py`` /
``eval.py`` / ``predict.py`` / ``export.py`` in a checkout, which call the same functions).

Each composes its config from the configs shipped in the package and runs under :func:`guarded`: an input error (a
bad value, a missing file, a checkpoint that does not fit) ends the process with one line on stderr and exit code 2,
and its traceback goes to ``error.log`` in the run directory. A value or key that the config's schemas refuse while
Hydra composes it (:func:`config_refusal`) ends the same way, before a run directory exists. ``docs/errors.md``
lists the inputs that are handled.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

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
    refusal = config_refusal(err)
    if refusal is not None:
        return refusal
    return " ".join(lines) or type(err).__name__


def config_refusal(err: BaseException) -> str | None:
    """The one line of a config that Hydra could not compose because OmegaConf refused a value or a key (a wrong
    type, not one of an Enum's members, a key a schema or a struct node lacks), or ``None`` for another error.

    Under a schema the line names the key and what it takes (:func:`segjml.utils.schema.config_error`); elsewhere it
    is Hydra's message and OmegaConf's on one line.
    """
    from segjml.utils.schema import config_error

    refused = (ValidationError, ConfigKeyError, ConfigAttributeError)
    cause = err if isinstance(err, refused) else err.__cause__
    if not isinstance(cause, refused):
        return None
    if cause is not err and not is_dataclass(cause.object_type):  # Hydra's words ("To append ... use +key=...")
        return " ".join(f"{err} ({str(cause.msg).strip().splitlines()[0]})".split())
    return config_error(cause)


def null_parent_refusal(config_name: str, overrides: list[str]) -> str | None:
    """The line for the first command-line override that sets a key under a node the config leaves null
    (``loss.kd.mix=authors`` with a loss that does not distil), or ``None`` if no override does.

    The config is composed again with the group choices only (``experiment=``, ``loss=``, ...), which is what makes
    a node null; a dotted override names a value inside it.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from segjml.config import CONFIG_DIR, compose

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
        values = [o for o in parsed if "." in o.key_or_group and o.package is None and not o.is_delete()]
        GlobalHydra.instance().clear()
        cfg = compose([o.input_line for o in parsed if o not in values], config_name)
    except Exception:  # the choices themselves do not compose: Hydra's own error stands
        return None
    absent = object()
    for override in values:
        parts = override.key_or_group.split(".")
        for depth in range(1, len(parts)):
            node = ".".join(parts[:depth])
            if OmegaConf.select(cfg, node, default=absent) is None:
                group = node.replace(".", "/")  # loss.kd is filled by the group loss/kd, when there is one
                options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
                turn_on = f"add +{group}={options[0]} before it" if options else f"set {node} first"
                return (
                    f"{override.input_line.lstrip('+')} sets a key under {node}, which is null (off) in this config; "
                    f"{turn_on}, or choose a preset that sets {node}"
                )
    return None


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


def run_export(cfg: DictConfig) -> None:
    """Write a checkpoint's model as ONNX or TorchScript (``export`` config)."""
    from segjml.engine.export import export_checkpoint

    guarded(cfg, lambda: export_checkpoint(cfg))


def _hydra_main(config_name: str, task: Callable[[DictConfig], Any]) -> Any:
    """Run ``task`` as a Hydra app; a config refused while it is composed ends with one line and exit code 2.

    Hydra prints a composition error itself unless ``HYDRA_FULL_ERROR=1``, so it is set while the app runs and the
    error is caught here. Any other composition error is printed as Hydra prints it (exit code 1); an exception of
    the task keeps its whole traceback. A user who set ``HYDRA_FULL_ERROR=1`` gets every traceback.
    """
    import hydra
    from hydra.errors import CompactHydraException

    from segjml.config import CONFIG_DIR

    started = False

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Any:
        nonlocal started
        started = True
        return task(cfg)

    app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(run)
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return app()
    except CompactHydraException as err:
        if started or full_error == "1":
            raise
        refusal = config_refusal(err)
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            sys.exit(2)
        print(err, file=sys.stderr)  # as Hydra's run_and_report prints it
        if isinstance(err.__cause__, Exception):
            print(err.__cause__, file=sys.stderr)
        sys.exit(1)
    except Exception:
        # OmegaConf cannot apply `a.b.c=v` where a.b is null (an AssertionError, not a Hydra error): name the key
        refusal = None if started or full_error == "1" else null_parent_refusal(config_name, sys.argv[1:])
        if refusal is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def train_main() -> None:
    """``segjml-train [key=value ...]`` (= ``python train.py``)."""
    _hydra_main("train", run_training)


def eval_main() -> None:
    """``segjml-eval ckpt=<path> [...]`` (= ``python eval.py``)."""
    _hydra_main("eval", run_evaluation)


def predict_main() -> None:
    """``segjml-predict ckpt=<path> inputs=<dir or glob>`` (= ``python predict.py``)."""
    _hydra_main("predict", run_prediction)


def export_main() -> None:
    """``segjml-export ckpt=<path> [format=onnx|torchscript] [output=<file>]`` (= ``python export.py``)."""
    _hydra_main("export", run_export)
