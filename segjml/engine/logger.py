"""Run logging: a JSON-lines file of every logged value, and optionally Weights & Biases (offline by default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class RunLogger:
    """Writes ``log.jsonl`` in the run directory and forwards to wandb when ``logger`` configures it.

    Only the main process logs; the others get a logger that does nothing.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool = True) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "log.jsonl", "a", buffering=1) if enabled else None
        self.wandb = None
        target = cfg.logger.get("_target_") if cfg.get("logger") else None
        if enabled and target:
            import wandb

            kwargs = {k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items() if k != "_target_"}
            self.wandb = wandb.init(
                config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resume="allow", **kwargs
            )

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
