"""Where the configs live, how they are composed, and the typed schemas of the groups the loop reads directly.

The configs ship inside the package (``segjml/configs``; ``configs/`` at the top of a checkout points there), so
``segjml-train`` finds them from any working directory. The trainer schema is registered in Hydra's ConfigStore
(``configs/trainer/default.yaml`` extends ``base_trainer``), so a wrong value on the command line
(``trainer.max_iters=abc``) or a misspelt key is refused by Hydra when the config is composed, before anything is
built.

A checkpoint stores the resolved config that wrote it: :func:`config_hash`, :func:`config_diff` and
:func:`check_resumable_config` tell whether a run may resume from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from segjml.losses.schema import register as register_loss_schemas

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def run_name(experiment: str | None, dataset: str, model: str, loss: str) -> str:
    """The run name of a composition: the preset's name when one is used, else ``<dataset>_<model>_<loss>``."""
    return str(experiment) if experiment else f"{dataset}_{model}_{loss}"


def teacher_checkpoint(log_dir: str, experiment: str | None, fold: int | None = None) -> str | None:
    """The ``last.pt`` of the run that trains a KD preset's teacher, where ``make reproduce`` puts it: seed 0
    (``<log_dir>/<experiment>/seed=0/checkpoints/last.pt``), or on a cross-validated data set the student's fold
    (``.../dataset.fold=<fold>/...``); ``None`` without a teacher experiment. The default of ``teacher.checkpoint``
    (``configs/train.yaml``)."""
    if experiment is None:
        return None
    run = "seed=0" if fold is None else f"dataset.fold={fold}"
    return f"{log_dir}/{experiment}/{run}/checkpoints/last.pt"


def class_count(classes) -> int:
    """``dataset.num_classes`` of ``dataset=folder``: the number of names in ``dataset.classes``, a list or a text file
    with one name per line (read by :func:`segjml.data.own.read_classes`)."""
    from segjml.data.own import class_count as count  # the data package is imported only when this is resolved

    return count(classes)


def class_names(classes) -> list[str]:
    """``dataset.class_names`` of ``dataset=folder``: the names of ``dataset.classes`` (a list, or read from its file),
    so a checkpoint's stored config holds the names themselves."""
    from segjml.data.own import read_classes

    return read_classes(classes)


# Config keys that do not define a run (dotted prefixes: every key under one counts too). They are left out of the run
# directory's name (Hydra's ``exclude_keys``, through :func:`run_independent_overrides`), and a checkpoint resumes
# when only they differ (``trainer.max_iters`` may only grow): the same command with one of them changed continues
# the same run. The one list of them.
RUN_INDEPENDENT_KEYS: tuple[str, ...] = (
    "experiment",  # the run name is the directory's first part, not repeated in the overrides part
    "name",
    "trainer.max_iters",  # extends a finished or running run (fewer iterations are refused on resume)
    "trainer.log_interval",  # logging and checkpointing: how often
    "trainer.eval_interval",
    "trainer.ckpt_interval",
    "trainer.ckpt_minutes",
    "trainer.progress",
    "logger",  # W&B project, mode, tags
    "trainer.num_workers",  # loading speed only: augmentation is seeded per sample
    "trainer.lock_stale_minutes",  # when a dead run's run.lock is taken over
    "trainer.resume",  # where files are: the checkpoint to resume from, data and output directories
    "trainer.allow_config_change",
    "paths",
    "teacher.checkpoint",  # the teacher itself is checked by its SHA-256
)


def override_key(override: str) -> str:
    """The config key of a command-line override: ``+a.b=1`` / ``~a.b`` / ``a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def is_run_independent(key: str) -> bool:
    """Whether ``key`` (dotted) is, or lies under, one of :data:`RUN_INDEPENDENT_KEYS`."""
    return any(key == k or key.startswith(k + ".") for k in RUN_INDEPENDENT_KEYS)


def run_independent_overrides(overrides) -> list[str]:
    """The keys of ``overrides`` (a job's task overrides) that do not define the run: what Hydra leaves out of
    ``job.override_dirname`` (``configs/hydra/default.yaml``)."""
    return [key for key in map(override_key, overrides or ()) if is_run_independent(key)]


def sweep_dirname(override_dirname: str) -> str:
    """The ``job.override_dirname`` of a sweep's job as the same command without ``-m`` spells it.

    Hydra's sweeper rewrites every override of a job from its parsed value, so ``pretrained=false`` arrives as
    ``pretrained=False``; lower-casing the booleans (as the docs and ``--cfg`` write them) gives the job the directory
    of the single run.
    """
    return re.sub(r"(?<==)(True|False)(?=,|$)", lambda m: m.group(1).lower(), override_dirname)


def compose(
    overrides: list[str] | tuple[str, ...] = (), config_name: str = "train", output_dir: str | Path | None = None
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` as the command line would, outside a Hydra app.

    ``${hydra:...}`` values (the run name, the run directory) are resolved here, so the returned config no longer
    depends on Hydra's global state. ``output_dir`` replaces ``paths.output_dir`` (default: the run directory Hydra
    would create).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if "name" in cfg:
            cfg.name = str(cfg.name)
        if "paths" in cfg:
            cfg.paths.output_dir = str(output_dir) if output_dir is not None else str(cfg.hydra.run.dir)
        del cfg.hydra
    return cfg


# ------------------------------------------------------------------------------------------- config fingerprints

_MISSING = object()


def to_plain(cfg: Any) -> Any:
    """An OmegaConf config as plain containers (resolved); anything else unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def config_hash(cfg: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``cfg`` as JSON with sorted keys (values JSON cannot hold are written with ``str``)."""
    return hashlib.sha256(json.dumps(to_plain(cfg), sort_keys=True, default=str).encode()).hexdigest()


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value; an empty mapping is a leaf (so adding or removing it counts)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normalised(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal config values: lists and tuples alike, NaN equal to NaN, ``True`` not equal to ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # a value whose == gives no single truth value
        return False


def _ignored(key: str, patterns: list[list[str]]) -> bool:
    parts = key.split(".")
    return any(len(parts) >= len(p) and all(q == "*" or q == k for q, k in zip(p, parts)) for p in patterns)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The dotted keys whose values differ between ``old`` and ``new``, sorted.

    A key present in only one of them counts as differing. ``ignore`` holds dotted prefixes: a key equal to or
    under one is skipped; a ``*`` segment matches any one segment (``trainer.*.mode``, ``trainer.eval.*``).
    """
    flat_old, flat_new = _flatten(to_plain(old)), _flatten(to_plain(new))
    patterns = [p.split(".") for p in ignore]
    differ = [
        key
        for key in flat_old.keys() | flat_new.keys()
        if not _ignored(key, patterns) and not _same(flat_old.get(key, _MISSING), flat_new.get(key, _MISSING))
    ]
    return sorted(differ)


def short_value(value: Any) -> str:
    """A config value on one line of at most 40 characters, for error messages (``unset`` for a missing key)."""
    if value is _MISSING:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(_normalised(value), default=str)
    text = " ".join(str(text).split()) or repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resumable_config(old: Mapping[str, Any] | None, new: Mapping[str, Any], source: str) -> None:
    """Refuse to resume checkpoint ``source`` (written with config ``old``) under a different config ``new``.

    Keys of :data:`RUN_INDEPENDENT_KEYS` may differ, except that ``trainer.max_iters`` may only grow. ``old=None`` (a
    checkpoint that stores no config) is not checked. Honouring ``trainer.allow_config_change`` and comparing
    ``trainer.max_iters`` with the checkpoint's iteration are left to the caller.

    Raises:
        CheckpointError: one line listing up to 5 differing keys with their old and new values.
    """
    from segjml.engine.checkpoint import CheckpointError  # the engine imports this module, not the other way

    if old is None:
        return
    old, new = to_plain(old), to_plain(new)
    differ = config_diff(old, new, RUN_INDEPENDENT_KEYS)
    flat_old, flat_new = _flatten(old), _flatten(new)
    old_iters = flat_old.get("trainer.max_iters", _MISSING)
    new_iters = flat_new.get("trainer.max_iters", _MISSING)
    if isinstance(old_iters, (int, float)) and isinstance(new_iters, (int, float)) and new_iters < old_iters:
        differ = sorted([*differ, "trainer.max_iters"])
    if not differ:
        return
    shown = ", ".join(
        f"{k} ({short_value(flat_old.get(k, _MISSING))} -> {short_value(flat_new.get(k, _MISSING))})"
        for k in differ[:5]
    )
    more = f", and {len(differ) - 5} more" if len(differ) > 5 else ""
    raise CheckpointError(
        f"checkpoint {source} was written by a different config: {shown}{more}; rerun with the "
        "old values, use a new run directory, or pass trainer.allow_config_change=true to resume "
        "anyway"
    )


@dataclass
class EvalConfig:
    """``trainer.eval``: how the validation runs during training evaluate."""

    mode: str = "whole"  # whole | slide (windows of dataset.crop_size, stride 2/3)
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TrainerConfig:
    """``trainer``: the one place of the trainer's defaults (``configs/trainer/default.yaml`` only selects it). They
    are the paper's CNN recipe (Appendix B); a data set's recipe (``configs/recipe/<dataset>.yaml``) states what
    differs."""

    max_iters: int = 40000
    batch_size: int = 8  # images per process and micro-batch; the global batch is this x accumulate_steps x processes
    accumulate_steps: int = 1  # micro-batches per optimizer step (the loss is the whole batch's, docs/distributed.md)
    val_batch_size: int = 1
    num_workers: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False  # torch.compile the model for training
    cudnn_benchmark: bool = True  # GPU: cuDNN picks the fastest convolutions for the crop size (training only)
    tf32: bool = True  # GPU (Ampere+): the model's float32 matmuls/convolutions on TF32; the losses stay float32
    # torch.use_deterministic_algorithms (warn_only) + deterministic cuDNN (docs/distributed.md)
    deterministic: bool = False
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm under DDP on GPUs
    head_lr_mult: float = 10.0  # decoder and heads train at 10x the backbone lr
    no_decay_1d: bool = True  # no weight decay on norms and biases
    log_interval: int = 50
    eval_interval: int = 4000
    ckpt_interval: int = 1000
    # also write last.pt when this much wall time passed since the last write (0 or null: off)
    ckpt_minutes: float | None = 30.0
    # a run.lock on another host untouched this long belongs to a dead run (docs/training.md)
    lock_stale_minutes: float | None = 10.0
    progress: bool = True
    limit_train_samples: int | None = None  # use only the first N samples of a split (debugging)
    limit_val_samples: int | None = None
    skip_nonfinite: bool = False  # false: stop on a non-finite loss (before the step); true: skip that batch
    resume: str | None = None  # path of a checkpoint; by default the run directory's checkpoints/last.pt is resumed
    allow_config_change: bool = False  # resume from a checkpoint of a different config (docs/errors.md)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """The trainer, loss and ssl schemas in Hydra's ConfigStore, the ``run_name`` resolver the main config names runs
    with, ``teacher_checkpoint`` (the KD teacher's default path), the ``sweep_dirname`` and
    ``run_independent_overrides`` ones that place runs and a sweep's jobs (``configs/hydra/default.yaml``), and
    ``class_count`` and ``class_names`` (``dataset=folder``'s classes)."""
    ConfigStore.instance().store(group="trainer", name="base_trainer", node=TrainerConfig)
    register_loss_schemas(ConfigStore.instance())  # loss/common/base_criterion, ssl/base_ssl
    for name, resolver in (
        ("run_name", run_name),
        ("teacher_checkpoint", teacher_checkpoint),
        ("sweep_dirname", sweep_dirname),
        ("run_independent_overrides", run_independent_overrides),
        ("class_count", class_count),
        ("class_names", class_names),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_configs()
