"""Predict images: ``python predict.py ckpt=<path> inputs=<dir or glob>``.

Writes ``<stem>_pred.png`` (colour-coded classes), ``<stem>_overlay.png`` and ``<stem>_conf.png`` (top-class
confidence) for every input image to the run directory.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    from segjml.cli import run_prediction

    run_prediction(cfg)


if __name__ == "__main__":
    main()
