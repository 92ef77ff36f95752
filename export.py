"""Export a checkpoint: ``python export.py ckpt=<path> [format=onnx|torchscript] [output=<file>]``.

The same as the ``segjml-export`` command: writes the model (normalisation in the graph, main head's logits out,
dynamic batch, height and width) with its class names, mean and std in the file's metadata (docs/export.md).
"""

from segjml.cli import export_main

if __name__ == "__main__":
    export_main()
