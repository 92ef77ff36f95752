"""Every option of every config group composes; the demo defaults are the demo experiment."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, ROOT, compose_config, group_options

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def test_all_concerns_have_a_group():
    expected = {"dataset", "model", "loss", "optimizer", "scheduler", "trainer", "logger", "paths", "hydra",
                "experiment", "debug"}
    assert expected <= set(GROUPS)


def _paper_preset(group: str, option: str) -> bool:
    """Paper experiment presets are composed and checked against the paper in test_reproduce."""
    return group == "experiment" and option.split("_")[0] in ("cs", "voc", "ade", "dg")


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS if g not in ("hydra", "recipe") for o in group_options(g) if not _paper_preset(g, o)],
)
def test_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["dataset"]["num_classes"] > 0
    if group == "experiment":
        assert container["name"], "every experiment names its runs"


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_recipes_compose_on_top_of_the_defaults(recipe, tmp_path):
    cfg = OmegaConf.to_container(compose_config([f"+recipe={recipe}"], tmp_path), resolve=True)
    assert cfg["dataset"]["name"] == recipe.replace("_smoke", "")


def test_slurm_launcher_option_composes(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "hydra/launcher=submitit_slurm",
                           "experiment=voc_dl3r18_jml_bls", "--cfg", "hydra", "--package", "hydra.launcher"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout


def test_defaults_are_the_demo(tmp_path):
    default = OmegaConf.to_container(compose_config([], tmp_path), resolve=True)
    demo = OmegaConf.to_container(compose_config(["experiment=demo"], tmp_path), resolve=True)
    assert default == demo
    assert default["pretrained"] is False and default["dataset"]["name"] == "synthetic"


def test_model_presets_follow_the_global_pretrained_switch(tmp_path):
    for option in group_options("model"):
        cfg = compose_config([f"model={option}", "pretrained=true"], tmp_path)
        assert cfg.model.pretrained is True, option
