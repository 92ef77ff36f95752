"""Where the configs live, how they are composed, and the typed schemas of the groups the loop reads directly.

The configs ship inside the package (``segjml/configs``; ``configs/`` at the top of a checkout points there), so
``segjml-train`` finds them from any working directory. The trainer schema is registered in Hydra's ConfigStore
(``configs/trainer/default.yaml`` extends ``base_trainer``), so a wrong value on the command line
(``trainer.max_iters=abc``) or a misspelt key is refused by Hydra when the config is composed, before anything is
built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def run_name(experiment: str | None, dataset: str, model: str, loss: str) -> str:
    """The run name of a composition: the preset's name when one is used, else ``<dataset>_<model>_<loss>``."""
    return str(experiment) if experiment else f"{dataset}_{model}_{loss}"


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


@dataclass
class EvalConfig:
    mode: str = "whole"
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TrainerConfig:
    max_iters: int = 40000
    batch_size: int = 8
    val_batch_size: int = 1
    num_workers: int = 4
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = True
    tf32: bool = True
    deterministic: bool = False
    sync_bn: bool = True
    head_lr_mult: float = 10.0
    no_decay_1d: bool = True
    log_interval: int = 50
    eval_interval: int = 4000
    ckpt_interval: int = 1000
    ckpt_minutes: float | None = 30.0
    lock_stale_minutes: float | None = 10.0
    progress: bool = True
    resume: str | None = None
    skip_nonfinite: bool = False
    limit_train_samples: int | None = None
    limit_val_samples: int | None = None
    accumulate_steps: int = 1
    allow_config_change: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """The trainer schema in Hydra's ConfigStore, the ``run_name`` resolver the main config names runs with, and the
    ``sweep_dirname`` and ``run_independent_overrides`` ones that place runs and a sweep's jobs
    (``configs/hydra/default.yaml``)."""
    ConfigStore.instance().store(group="trainer", name="base_trainer", node=TrainerConfig)
    for name, resolver in (
        ("run_name", run_name),
        ("sweep_dirname", sweep_dirname),
        ("run_independent_overrides", run_independent_overrides),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_configs()
