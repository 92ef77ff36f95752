"""Predict images: ``python predict.py ckpt=<path> inputs=<dir or glob>``.

The same as the ``segjml-predict`` command: writes ``<stem>_pred.png`` (colour-coded classes), ``<stem>_overlay.png``
and ``<stem>_conf.png`` (top-class confidence) for every input image to a timestamped folder.
"""

from segjml.cli import predict_main

if __name__ == "__main__":
    predict_main()
