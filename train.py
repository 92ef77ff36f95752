"""Train a segmentation model: ``python train.py [experiment=NAME] [key=value ...]``.

A thin Hydra entry point; everything happens in :func:`segjml.engine.train`.
"""

import hydra
from omegaconf import DictConfig

import segjml.config  # noqa: F401  (registers the typed config schemas)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from segjml.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    main()
