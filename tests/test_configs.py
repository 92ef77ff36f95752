"""Every option of every config group composes; the demo defaults are the demo experiment."""

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, compose_config, group_options

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def test_all_concerns_have_a_group():
    expected = {"dataset", "model", "loss", "optimizer", "scheduler", "trainer", "logger", "paths", "hydra",
                "experiment", "debug"}
    assert expected <= set(GROUPS)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS if g != "hydra" for o in group_options(g)]
)
def test_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["dataset"]["num_classes"] > 0
    if group == "experiment":
        assert container["name"], "every experiment names its runs"


def test_defaults_are_the_demo(tmp_path):
    default = OmegaConf.to_container(compose_config([], tmp_path), resolve=True)
    demo = OmegaConf.to_container(compose_config(["experiment=demo"], tmp_path), resolve=True)
    assert default == demo
    assert default["pretrained"] is False and default["dataset"]["name"] == "synthetic"


def test_model_presets_follow_the_global_pretrained_switch(tmp_path):
    for option in group_options("model"):
        cfg = compose_config([f"model={option}", "pretrained=true"], tmp_path)
        assert cfg.model.pretrained is True, option
