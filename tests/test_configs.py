"""Every option of every config group composes; a data set brings its recipe; each layer states only what differs
(the presets resolve as before: tests/test_preset_snapshot.py)."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from segjml.config import TrainerConfig, compose, teacher_checkpoint
from segjml.reproduce.grid import with_teacher
from tests.helpers import CONFIG_DIR, ROOT, compose_config, group_options

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def test_all_concerns_have_a_group():
    expected = {
        "dataset",
        "model",
        "loss",
        "optimizer",
        "scheduler",
        "trainer",
        "metrics",
        "logger",
        "paths",
        "hydra",
        "experiment",
        "debug",
    }
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
def test_every_recipe_composes(recipe, tmp_path):
    cfg = OmegaConf.to_container(compose_config([f"recipe={recipe}"], tmp_path), resolve=True)
    assert cfg["trainer"]["max_iters"] > 0


def test_slurm_launcher_option_composes(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "hydra/launcher=submitit_slurm",
            "experiment=voc_dl3r18_jml_bls",
            "--cfg",
            "hydra",
            "--package",
            "hydra.launcher",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout


def test_no_argument_is_the_demo(tmp_path):
    default = OmegaConf.to_container(compose_config([], tmp_path), resolve=True)
    demo = OmegaConf.to_container(compose_config(["experiment=demo"], tmp_path), resolve=True)
    assert default.pop("name") == "synthetic_demo_ce_jml" and demo.pop("name") == "demo"
    default["logger"].pop("name"), demo["logger"].pop("name")
    assert default == demo
    assert default["pretrained"] is False and default["dataset"]["name"] == "synthetic"
    assert default["trainer"]["max_iters"] == 600 and default["optimizer"]["lr"] == 0.02


# The paper's recipes (Appendix B): data set -> (iterations, optimizer, lr, scheduler power)
PAPER_RECIPES = {
    "voc": (40000, "torch.optim.SGD", 0.01, 0.9),
    "cityscapes": (40000, "torch.optim.SGD", 0.01, 0.9),
    "ade20k": (40000, "torch.optim.AdamW", 6e-5, 1.0),
    "deepglobe_land": (10000, "torch.optim.SGD", 0.01, 0.9),
}


@pytest.mark.parametrize("dataset", sorted(PAPER_RECIPES))
@pytest.mark.parametrize("others", [[], ["model=dl3_r18", "loss=ce_jml_bls"], ["loss=ce", "model=segformer_b0"]])
def test_choosing_a_dataset_brings_its_paper_recipe_whatever_else_is_chosen(dataset, others, tmp_path):
    cfg = OmegaConf.to_container(compose_config([f"dataset={dataset}", *others], tmp_path), resolve=True)
    iters, optimizer, lr, power = PAPER_RECIPES[dataset]
    t = cfg["trainer"]
    assert (t["max_iters"], cfg["optimizer"]["_target_"], cfg["optimizer"]["lr"]) == (iters, optimizer, lr)
    assert cfg["scheduler"]["power"] == power
    assert (t["batch_size"], t["val_batch_size"], t["num_workers"]) == (8, 1, 4)
    assert cfg["pretrained"] is True and cfg["model"]["pretrained"] is True
    assert tuple(cfg["dataset"]["crop_size"]) == ((512, 1024) if dataset == "cityscapes" else (512, 512))
    model = next((o.split("=")[1] for o in others if o.startswith("model=")), "demo")
    loss = next((o.split("=")[1] for o in others if o.startswith("loss=")), "ce_jml")
    assert cfg["name"] == f"{dataset}_{model}_{loss}"


def test_an_explicit_override_wins_over_the_recipe(tmp_path):
    cfg = compose_config(
        [
            "dataset=voc",
            "trainer.max_iters=7",
            "optimizer=adamw",
            "optimizer.lr=0.5",
            "pretrained=false",
            "trainer.val_batch_size=2",
        ],
        tmp_path,
    )
    assert (cfg.trainer.max_iters, cfg.optimizer._target_, cfg.optimizer.lr) == (7, "torch.optim.AdamW", 0.5)
    assert cfg.pretrained is False and cfg.model.pretrained is False and cfg.trainer.val_batch_size == 2


def test_model_presets_follow_the_global_pretrained_switch(tmp_path):
    for option in group_options("model"):
        cfg = compose_config([f"model={option}", "pretrained=true"], tmp_path)
        assert cfg.model.pretrained is True, option


# --- each default is written in one place -------------------------------------------------------------------------


def test_the_trainer_defaults_are_written_once_in_the_schema():
    assert set(OmegaConf.load(CONFIG_DIR / "trainer" / "default.yaml")) == {"defaults"}  # it only selects the schema
    assert compose_config(["dataset=voc"]).trainer.max_iters == TrainerConfig.max_iters == 40000


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_a_recipe_states_only_what_differs_from_the_trainer_defaults(recipe):
    defaults = OmegaConf.structured(TrainerConfig)
    trainer = OmegaConf.load(CONFIG_DIR / "recipe" / f"{recipe}.yaml").get("trainer") or {}
    assert [key for key, value in trainer.items() if defaults[key] == value] == []


@pytest.mark.parametrize("dataset", group_options("dataset"))
def test_a_dataset_states_only_what_differs_from_the_common_base(dataset, tmp_path):
    base = OmegaConf.load(CONFIG_DIR / "dataset" / "common" / "base.yaml")
    own = OmegaConf.load(CONFIG_DIR / "dataset" / f"{dataset}.yaml")
    assert list(own.defaults) == ["/dataset/common/base@_here_", "_self_"]
    assert [key for key in base if key in own and own[key] == base[key]] == []
    for config_name, extra in (("train", []), ("eval", ["ckpt=x.pt"])):  # dataset=<name> for train.py and eval.py
        cfg = compose([f"dataset={dataset}", *extra], config_name=config_name, output_dir=tmp_path)
        assert cfg.dataset.name == dataset
        assert all(cfg.dataset[key] == own.get(key, base[key]) for key in base)


@pytest.mark.parametrize("loss", ["ce_bls", "ce_jml_bls"])
def test_the_bls_losses_bring_the_papers_bls_with_the_authors_rule(loss, tmp_path):
    cfg = compose_config([f"loss={loss}"], tmp_path)
    assert OmegaConf.to_container(cfg.loss.bls) == {"kernel_size": 3, "eps": 0.5, "strict_ignore": True}


def test_no_experiment_preset_restates_the_bls_rule_or_the_teacher_path():
    """The BLS rule comes from the loss (only the synthetic and claims presets opt out), the teacher path from
    ``teacher_checkpoint``."""
    for name in group_options("experiment"):
        node = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
        assert "checkpoint" not in (node.get("teacher") or {}), name
        bls = (node.get("loss") or {}).get("bls") or {}
        assert bls.get("strict_ignore", False) is False, name
        assert "strict_ignore" not in bls or name.startswith(("syn_", "claims_")), name


def test_training_and_eval_read_the_one_metrics_group(tmp_path):
    group = OmegaConf.load(CONFIG_DIR / "metrics" / "default.yaml")
    train = compose_config(["metrics.worst_q=5"], tmp_path)
    evaluation = compose(["ckpt=x.pt", "metrics.worst_q=5"], config_name="eval", output_dir=tmp_path)
    assert train.metrics == evaluation.metrics == OmegaConf.merge(group, {"worst_q": 5})


# --- the KD teacher's checkpoint ------------------------------------------------------------------------------------


def test_teacher_checkpoint_resolver():
    assert teacher_checkpoint("/logs", None) is None and teacher_checkpoint("/logs", None, 2) is None
    assert teacher_checkpoint("/logs", "voc_t") == "/logs/voc_t/seed=0/checkpoints/last.pt"
    assert teacher_checkpoint("/logs", "dg_t", 3) == "/logs/dg_t/dataset.fold=3/checkpoints/last.pt"
    assert teacher_checkpoint("/logs", "dg_t", 0) == "/logs/dg_t/dataset.fold=0/checkpoints/last.pt"


@pytest.mark.parametrize(
    "experiment,overrides",
    [("voc_dl3r18_jml_kd", ["seed=1"]), ("syn_tiny_jml_kd", ["seed=2"]), ("dg_unetr18_jml_kd", ["dataset.fold=3"])],
)
def test_a_kd_preset_reads_its_teacher_where_the_reproduce_runner_writes_it(experiment, overrides, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.log_dir={tmp_path}", *overrides])
    teacher_run = with_teacher(experiment, tuple(overrides)).teacher
    assert cfg.teacher.checkpoint == str(teacher_run.run_dir(tmp_path) / "checkpoints" / "last.pt")


def test_an_explicit_teacher_checkpoint_wins_and_no_teacher_means_none(tmp_path):
    chosen = compose_config(["experiment=voc_dl3r18_jml_kd", "teacher.checkpoint=/my/teacher.pt"], tmp_path)
    assert chosen.teacher.checkpoint == "/my/teacher.pt"
    assert compose_config(["loss=ce_jml_kd"], tmp_path).teacher.checkpoint is None
