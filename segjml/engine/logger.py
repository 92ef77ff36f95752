"""Run logging: a JSON-lines file of every logged value, and one tracker chosen by ``logger=``.

The trackers: Weights & Biases (``logger=wandb``, offline, the default), TensorBoard event files
(``logger=tensorboard``), an MLflow run (``logger=mlflow``) or none (``logger=none``). A resumed run continues the
tracker's run: the same TensorBoard directory (steps after the checkpoint are purged) and the same MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from segjml.utils import build

log = logging.getLogger(__name__)


class MissingExtraError(ValueError):
    """A logger whose package is not installed (a ValueError: the command line ends with one line, exit code 2)."""

    def __init__(self, logger: str, package: str) -> None:
        super().__init__(f"logger={logger} needs the {package} package: pip install 'segjml[{logger}]'")


class Tracker:
    """Where logged values go besides ``log.jsonl``; this base sends them nowhere (``logger=none``).

    ``overlays``: how many validation images :meth:`images` wants with each evaluation, overlaid with their
    prediction; ``takes_images``: whether it wants images at all (the trainer renders none otherwise).
    """

    takes_images = False
    overlays = 0

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """HWC uint8 images by name (the reliability diagram, prediction overlays)."""

    def artifacts(self, run_dir: Path) -> None:
        """The finished run's files: ``metrics.json``, ``reliability.png``, checkpoints."""

    def close(self) -> None:
        pass


class WandbTracker(Tracker):
    """``logger=wandb``: the options of ``configs/logger/wandb.yaml`` are ``wandb.init``'s keyword arguments."""

    def __init__(self, cfg: DictConfig) -> None:
        import wandb

        kwargs = {k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items() if k != "_target_"}
        self.run = wandb.init(
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resume="allow", **kwargs
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    """``logger=tensorboard``: event files in ``<run dir>/<subdir>``: every scalar of ``log.jsonl``, and at each
    evaluation the reliability diagram and ``overlays`` validation images with their prediction.

    A resumed run writes to the same directory with ``purge_step`` just after the checkpoint's iteration, so readers
    drop what a killed attempt logged after its last checkpoint.
    """

    takes_images = True

    def __init__(self, run_dir: Path, cfg: DictConfig, start: int, subdir: str = "tensorboard", overlays: int = 4):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MissingExtraError("tensorboard", "tensorboard") from err
        self.overlays = overlays
        self.writer = SummaryWriter(str(Path(run_dir) / subdir), purge_step=start + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"dotted.key": str(value)}`` (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: str(tree)}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def local_uri(uri: str) -> str:
    """A path or ``file:`` URI as an absolute ``file://`` URI (a relative one would follow the working directory);
    any other URI (``sqlite:///...``, ``http://...``) as it is."""
    if ":" in uri and not uri.startswith("file:"):
        return uri
    return Path(uri.removeprefix("file:")).resolve().as_uri()


class MLflowTracker(Tracker):
    """``logger=mlflow``: one MLflow run per run directory, in the store at ``tracking_uri``.

    Logs the resolved config as parameters (dotted keys), every value of ``log.jsonl`` as a metric, and at the end
    ``metrics.json``, ``reliability.png`` and the ``checkpoints`` named (``best``, ``last``) as artifacts. The run's id
    is kept in ``<run dir>/mlflow_run_id``: a resumed run logs to the same MLflow run (new parameters are added; a
    value that changed between attempts, such as a larger ``trainer.max_iters``, keeps its first value).

    The MLflow client writes to the store directly (``MlflowClient``, no active run): nothing global is left behind
    for a process that trains several runs.
    """

    ID_FILE = "mlflow_run_id"

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        start: int,
        tracking_uri: str,
        experiment: str = "segjml",
        run_name: str | None = None,
        checkpoints: Sequence[str] = ("best",),
    ) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise MissingExtraError("mlflow", "mlflow") from err
        uri = local_uri(tracking_uri)
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked (it recommends a database); a local mlruns/ folder that
            # needs no server nor database is what logger=mlflow promises, and MLflow still reads and writes it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        self.run_dir, self.checkpoints, self.status = Path(run_dir), list(checkpoints), "KILLED"
        id_file = self.run_dir / self.ID_FILE
        self.run_id = id_file.read_text().strip() if id_file.exists() else None
        logged: dict[str, str] = {}
        if self.run_id is not None:
            try:
                logged = self.client.get_run(self.run_id).data.params
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("mlflow: continuing run %s in %s", self.run_id, uri)
            except MlflowException:
                log.warning("mlflow: run %s (%s) is not in %s; starting a new run", self.run_id, id_file, uri)
                self.run_id = None
        if self.run_id is None:
            self.run_id = self.client.create_run(self._experiment_id(experiment), run_name=run_name).info.run_id
            id_file.write_text(self.run_id + "\n")
            log.info("mlflow: run %s in %s", self.run_id, uri)
        params = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        self._log_batch(params=[(k, v) for k, v in params.items() if k not in logged])

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # made meanwhile by another run sharing the store
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_batch(self, metrics: Sequence[tuple[str, float, int]] = (), params: Sequence[tuple[str, str]] = ()):
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v, step in metrics]
        params = [Param(k, v[:6000]) for k, v in params]  # MLflow refuses longer values
        # the store takes at most 1000 metrics and 100 parameters per call
        for i in range(0, max(len(metrics), len(params)), 100):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        self._log_batch(metrics=[(k, v, step) for k, v in values.items()])

    def artifacts(self, run_dir: Path) -> None:
        for name in ("metrics.json", "reliability.png"):
            self.client.log_artifact(self.run_id, str(run_dir / name))
        for name in self.checkpoints:
            self.client.log_artifact(self.run_id, str(run_dir / "checkpoints" / f"{name}.pt"), "checkpoints")
        self.status = "FINISHED"

    def close(self) -> None:
        # KILLED until the run has finished: a stopped or failed attempt is resumed by rerunning the command
        self.client.set_terminated(self.run_id, self.status)


def build_tracker(run_dir: Path, cfg: DictConfig, start: int) -> Tracker:
    """The tracker ``cfg.logger`` names (``_target_``), continuing from iteration ``start``."""
    target = cfg.logger.get("_target_")
    if target is None:
        return Tracker()
    if target == "wandb.init":  # wandb.yaml names wandb.init itself (its options are wandb.init's arguments)
        return WandbTracker(cfg)
    return build(cfg.logger, run_dir=run_dir, cfg=cfg, start=start, _recursive_=False)


class RunLogger:
    """Writes ``log.jsonl`` in the run directory and forwards every value to the tracker ``logger`` configures.

    Only the main process logs; the others get a logger that does nothing. ``start``: the iteration the run
    resumed from (0 for a new run).
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool = True, start: int = 0) -> None:
        self.enabled = enabled
        self.tracker = build_tracker(run_dir, cfg, start) if enabled else Tracker()  # first: it may refuse
        self.file = open(run_dir / "log.jsonl", "a", buffering=1) if enabled else None

    @property
    def overlays(self) -> int | None:
        """How many prediction overlays :meth:`images` wants at each evaluation; ``None``: no images at all."""
        return self.tracker.overlays if self.tracker.takes_images else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.tracker.log(step, values)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.tracker.images(step, images)

    def artifacts(self, run_dir: Path) -> None:
        self.tracker.artifacts(run_dir)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.tracker.close()


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore_index: int, alpha: float = 0.5):
    """``image`` (H, W, 3) uint8 blended with the colours of ``label`` (H, W); ``ignore_index`` pixels unblended."""
    colour = palette[np.where(label == ignore_index, 0, label)]
    blended = (alpha * colour + (1 - alpha) * image).round().astype(np.uint8)
    return np.where((label == ignore_index)[..., None], image, blended)


def fit(image: np.ndarray, longest: int = 512) -> np.ndarray:
    """``image`` shrunk so that its longest side is at most ``longest`` pixels (event files stay small)."""
    import cv2

    scale = longest / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def figure_image(draw) -> np.ndarray:
    """The PNG that ``draw(file)`` writes (e.g. :func:`segjml.engine.report.reliability_diagram`), as HWC uint8."""
    from PIL import Image

    buffer = io.BytesIO()
    draw(buffer)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))
