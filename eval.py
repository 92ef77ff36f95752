"""Evaluate a checkpoint: ``python eval.py ckpt=<path> [dataset=<name>] [mode=slide] [flip=true] [scales=[...]]``.

Prints the per-class table and writes ``metrics.json`` and ``reliability.png`` to the run directory.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    from segjml.cli import run_evaluation

    return run_evaluation(cfg)


if __name__ == "__main__":
    main()
