"""Every command line in README.md and docs/ composes, and gives what its text promises.

Commands are collected from fenced code blocks (with ``\\`` continuations) and inline code spans that start with
``python``, ``torchrun``, ``make``, ``segjml-`` or ``pip``. Training, evaluation and prediction commands are composed
with Hydra as the command would compose them (a sweep takes the first value of each list) and every ``key=value``
they set is checked in the result; other commands are checked against what they name (a Makefile target and its
variables, a module, a script and its options, a package extra). ``PROMISES`` adds the values the text around a
command promises.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from segjml.config import CONFIG_DIR, compose
from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("python ", "torchrun ", "make ", "segjml-", "pip ")


def collect(path: Path) -> list[str]:
    commands, in_block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            text = f"{pending} {line.strip()}".strip() if pending else line.strip()
            pending = ""
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            if text.startswith(STARTS):
                commands.append(text)
        else:
            commands += [m for m in re.findall(r"`([^`]+)`", line) if m.startswith(STARTS)]
    return commands


COMMANDS = sorted({(path.name, command) for path in DOCS for command in collect(path)})


def words(command: str) -> list[str]:
    return shlex.split(placeholders(command), comments=True)


def placeholders(arg: str) -> str:
    """``experiment=<...>`` / ``dataset=<...>`` -> a real option; any other ``<...>`` -> a plain word."""
    arg = re.sub(r"experiment=<[^>]+>", "experiment=demo", arg)
    return re.sub(r"<[^>]+>", "x", re.sub(r"dataset=<[^>]+>", "dataset=synthetic", arg))


def overrides_of(args: list[str]) -> list[str]:
    """Hydra overrides of a command line: options dropped, a sweep reduced to its first value."""
    out = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = placeholders(arg).split("=", 1)
        if not (value.startswith(("'", '"', "[")) or key.startswith("hydra.")):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


def check_overrides_hold(cfg, overrides: list[str]) -> None:
    for override in overrides:
        key, value = override.split("=", 1)
        if key.startswith(("hydra", "+", "~")) or "/" in key:
            continue
        expected = yaml.safe_load(value)
        if isinstance(expected, str):
            expected = expected.strip("'\"")
        if (CONFIG_DIR / key).is_dir():  # a group choice
            if key == "experiment":
                assert cfg.name == expected
            elif key == "dataset":
                assert cfg.dataset.name == expected
            else:  # the chosen option's own literal values are in the result (unless overridden after it)
                option = OmegaConf.load(CONFIG_DIR / key / f"{expected}.yaml")
                for k in ("_target_", "arch", "encoder", "iou_loss"):
                    if k in option and f"{key}.{k}=" not in " ".join(overrides):
                        assert cfg[key][k] == option[k], f"{key}.{k}"
            continue
        actual = OmegaConf.select(cfg, key)
        if isinstance(actual, float) or isinstance(expected, float):
            assert actual == pytest.approx(expected), key
        else:
            assert actual == expected, key


def train_args(args: list[str]) -> list[str] | None:
    """The arguments after ``train.py`` / ``segjml-train`` (also under torchrun), or None."""
    for i, arg in enumerate(args):
        if arg in ("train.py", "segjml-train"):
            return args[i + 1 :]
    return None


# Values the surrounding text promises, beyond the overrides themselves.
PROMISES = {
    "python train.py": dict(name="synthetic_demo_ce_jml", max_iters=600, pretrained=False, dataset="synthetic"),
    "python train.py experiment=demo": dict(name="demo", max_iters=600, pretrained=False, encoder="mobilenetv2_050"),
    "python train.py experiment=demo loss=ce_jml_bls": dict(bls_eps=0.5, dataset="synthetic"),
    "python train.py model=dl3_r18 trainer.max_iters=2000": dict(
        dataset="synthetic", arch="deeplabv3", encoder="resnet18d"
    ),
    "python train.py dataset=voc model=dl3_r18 loss=ce_jml_bls": dict(
        name="voc_dl3_r18_ce_jml_bls", max_iters=40000, lr=0.01, val_batch_size=1, pretrained=True, encoder="resnet18d"
    ),
    "torchrun --standalone --nproc_per_node=4 train.py dataset=cityscapes model=dl3_r18 trainer.batch_size=2": dict(
        max_iters=40000, encoder="resnet18d", pretrained=True, dataset="cityscapes"
    ),
    "python train.py dataset=cityscapes model=dl3_r18 trainer.batch_size=4 trainer.accumulate_steps=2": dict(
        max_iters=40000, encoder="resnet18d"
    ),
    "python train.py dataset=voc trainer.max_iters=1000": dict(lr=0.01, val_batch_size=1, pretrained=True),
    "python train.py experiment=voc_dl3r18_jml_bls seed=1": dict(
        run_dir_end="voc_dl3r18_jml_bls/seed=1", pretrained=True
    ),
    "python train.py experiment=dg_unetr18_jml dataset.fold=3": dict(dataset="deepglobe_land", max_iters=10000),
    "torchrun --standalone --nproc_per_node=4 train.py experiment=cs_dl3r18_jml": dict(dataset="cityscapes"),
    "segjml-train trainer.max_iters=3": dict(dataset="synthetic", name="synthetic_demo_ce_jml"),
}


def check_promises(cfg, promise: dict) -> None:
    read = {
        "name": cfg.name,
        "max_iters": cfg.trainer.max_iters,
        "pretrained": cfg.model.pretrained,
        "dataset": cfg.dataset.name,
        "encoder": cfg.model.encoder,
        "arch": cfg.model.arch,
        "lr": cfg.optimizer.lr,
        "val_batch_size": cfg.trainer.val_batch_size,
        "bls_eps": (cfg.loss.bls or {}).get("eps"),
        "run_dir_end": None,
    }
    for key, value in promise.items():
        if key == "run_dir_end":
            assert str(cfg.paths.output_dir).rstrip("/").endswith(value)
        else:
            assert read[key] == value, key


def test_commands_were_found():
    found = {c for _, c in COMMANDS}
    assert len(COMMANDS) > 40
    assert set(PROMISES) <= {re.sub(r"\s+#.*$", "", c).strip() for c in found}, set(PROMISES) - found


@pytest.mark.parametrize("doc,command", COMMANDS)
def test_documented_command(doc, command, tmp_path):
    args = words(command)
    bare = " ".join(args)
    if (rest := train_args(args)) is not None:
        overrides = overrides_of(rest)
        cfg = compose(overrides)
        check_overrides_hold(cfg, overrides)
        check_promises(cfg, PROMISES.get(bare, {}))
        assert OmegaConf.to_container(cfg, resolve=True)
    elif args[0] in ("segjml-eval", "segjml-predict") or args[:2] in (["python", "eval.py"], ["python", "predict.py"]):
        name = "eval" if "eval" in " ".join(args[:2]) else "predict"
        overrides = overrides_of(args[1:] if args[0].startswith("segjml-") else args[2:])
        cfg = compose(
            [*overrides]
            + (["ckpt=x.pt"] if not overrides else [])
            + (["inputs=x"] if name == "predict" and not any(o.startswith("inputs=") for o in overrides) else []),
            config_name=name,
        )
        check_overrides_hold(cfg, overrides)
    elif args[0] == "segjml-export" or args[:2] == ["python", "export.py"]:
        overrides = overrides_of(args[1:] if args[0].startswith("segjml-") else args[2:])
        check_overrides_hold(compose(overrides, config_name="export"), overrides)
    elif args[:2] == ["python", "-m"]:
        module = args[2]
        assert importlib.util.find_spec(module) is not None, module
        if module == "segjml.data.validate":
            cfg = compose(overrides_of(args[3:]))
            check_overrides_hold(cfg, overrides_of(args[3:]))
        if module == "segjml.bench" and len(args) > 3:
            source = (ROOT / "segjml" / "bench" / "__main__.py").read_text()
            for mode in args[3].strip("{}").split(","):
                assert f'"{mode}"' in source, mode
    elif args[0] == "python" and args[1].startswith("scripts/"):
        source = (ROOT / args[1]).read_text()
        for option in (a.split("=")[0] for a in args[2:] if a.startswith("--")):
            assert f'"{option}"' in source, option
    elif args[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        if len(args) > 1:
            assert re.search(rf"^{re.escape(args[1])}:", makefile, re.M), args[1]
        for var in (a.split("=")[0] for a in args[2:] if "=" in a):
            assert f"$({var})" in makefile, var
    elif args[0] == "pip":
        extras = metadata.metadata("segjml").get_all("Provides-Extra")
        for extra in re.findall(r"\[(\w+)\]", command):
            assert extra in extras, extra
    else:
        pytest.fail(f"no check for the documented command {command!r}")


def test_cfg_job_prints_the_voc_recipe():
    """Acceptance of the composition fix, exactly as a user types it."""
    proc = subprocess.run(
        [sys.executable, "train.py", "dataset=voc", "model=dl3_r18", "loss=ce_jml_bls", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["trainer"]["max_iters"] == 40000 and cfg["optimizer"]["lr"] == 0.01
    assert cfg["trainer"]["val_batch_size"] == 1 and cfg["pretrained"] is True
    assert cfg["name"] != "demo" and str(cfg["name"]).startswith("${run_name:")  # Hydra prints interpolations as such
    resolved = subprocess.run(
        [sys.executable, "train.py", "dataset=voc", "model=dl3_r18", "loss=ce_jml_bls", "--cfg", "job", "--resolve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert yaml.safe_load(resolved.stdout)["name"] == "voc_dl3_r18_ce_jml_bls"
