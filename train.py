"""Train a segmentation model: ``python train.py [dataset=...] [model=...] [loss=...] [experiment=NAME] [key=value]``.

A thin entry point, the same as the ``segjml-train`` command; everything happens in :func:`segjml.engine.train`.
"""

from segjml.cli import train_main

if __name__ == "__main__":
    train_main()
