#!/usr/bin/env python
"""Write the resolved config of every preset to a JSON file, the snapshot ``tests/test_preset_snapshot.py`` compares
the configs with.

    python scripts/preset_snapshot.py [--out tests/data/preset_snapshot.json] [--checkout DIR]

A preset is a composition a user can ask for by name: ``train`` (``python train.py``, no argument), every experiment
(``experiment=<name>``), every option of every other group with the rest at defaults (``dataset=voc``,
``loss=ce_jml_bls``, ...), and the ``eval`` / ``predict`` configs (``eval dataset=<name>`` for every data set). The
paths are fixed (``paths.root_dir=/ROOT``, ``paths.data_dir=/DATA``, output directory ``/OUT``) and the ``hydra``
node is dropped, so the snapshot depends neither on the working directory, nor on the environment, nor on the time.

The snapshot is written once, from the configs before a reorganisation (``--checkout`` names that checkout, e.g. a
git worktree of the previous commit, whose ``segjml`` is then imported); the test lists the differences made on
purpose. Never regenerate it from the changed tree to make the test pass.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]

# Overrides that make every composition independent of the environment and of the working directory
FIXED_PATHS = ("paths.root_dir=/ROOT", "paths.data_dir=/DATA")
OUTPUT_DIR = "/OUT"  # for the run directory: it holds a timestamp for eval and predict
# Groups whose options are not presets: Hydra's own settings, and the paths (fixed above)
NOT_PRESET_GROUPS = ("hydra", "paths")


def presets(config_dir: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every preset: its name -> (config name, overrides)."""

    def options(group: str) -> list[str]:
        return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))

    groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name not in NOT_PRESET_GROUPS)
    out: dict[str, tuple[str, tuple[str, ...]]] = {"train": ("train", ())}
    for group in groups:
        for option in options(group):
            out[f"{group}={option}"] = ("train", (f"{group}={option}",))
    out["eval"] = ("eval", ("ckpt=/CKPT",))
    for option in options("dataset"):
        out[f"eval dataset={option}"] = ("eval", ("ckpt=/CKPT", f"dataset={option}"))
    out["predict"] = ("predict", ("ckpt=/CKPT", "inputs=/INPUTS"))
    return out


def composed(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """The config ``config_name`` composed with ``overrides`` and the fixed paths; ``paths.output_dir`` is the run
    directory Hydra would create."""
    from segjml.config import compose

    return compose([*overrides, *FIXED_PATHS], config_name=config_name)


def resolved(cfg: DictConfig) -> dict:
    """``cfg`` (from :func:`composed`) with the output directory fixed, every interpolation resolved."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = OUTPUT_DIR
    return OmegaConf.to_container(cfg, resolve=True)


def snapshot() -> dict[str, dict]:
    """Every preset's resolved config, by preset name."""
    from segjml.config import CONFIG_DIR

    return {name: resolved(composed(*spec)) for name, spec in presets(CONFIG_DIR).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "preset_snapshot.json")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose configs are composed")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.checkout.resolve()))
    import segjml

    print(f"composing the configs of {Path(segjml.__file__).parent}", file=sys.stderr)
    data = snapshot()
    # One preset per line: a change to the snapshot reads as a diff of the presets it touches
    lines = [f"{json.dumps(name)}: {json.dumps(cfg, sort_keys=True)}" for name, cfg in sorted(data.items())]
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {len(data)} presets to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
