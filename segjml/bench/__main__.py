"""``python -m segjml.bench {losses,metrics,data,trainer,train} [options]``."""

import sys


def main() -> None:
    commands = {
        "losses": "segjml.bench.losses",
        "metrics": "segjml.bench.metrics",
        "data": "segjml.bench.data",
        "trainer": "segjml.bench.trainer",
        "train": "segjml.bench.train",
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m segjml.bench {{{','.join(commands)}}} [options]  (--help for each)", file=sys.stderr)
        sys.exit(2)
    import importlib

    importlib.import_module(commands[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
