"""Evaluate a checkpoint: ``python eval.py ckpt=<path> [dataset=<name>] [mode=slide] [flip=true] [scales=[...]]``.

The same as the ``segjml-eval`` command: prints the per-class table and writes ``metrics.json`` and
``reliability.png`` to a timestamped folder.
"""

from segjml.cli import eval_main

if __name__ == "__main__":
    eval_main()
