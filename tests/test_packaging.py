"""The wheel trains anywhere: configs inside the package, console scripts, ``python -m`` tools, declared extras."""

import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed with ``pip install --target`` (its dependencies come from the
    test environment); returns the target and an environment whose ``sys.path`` starts there."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # what the wheel is built from, copied so that the build leaves the checkout clean
    shutil.copytree(ROOT / "segjml", source / "segjml", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("segjml-*.whl"))
    target = tmp / "target"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "SEGJML_DATA")}
    env.update(PYTHONPATH=str(target), WANDB_MODE="disabled")
    return target, env


def run(command, cwd, env, timeout=600):
    """A command of the installed wheel, run from ``cwd`` with the wheel first on ``sys.path``."""
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_package_comes_from_the_wheel_with_its_version_and_configs(installed, tmp_path):
    target, env = installed
    code = "import segjml, segjml.config as c; print(segjml.__file__); print(segjml.__version__); print(c.CONFIG_DIR)"
    out = run([sys.executable, "-c", code], tmp_path, env).stdout.split()
    version = metadata.version("segjml")
    assert out[0].startswith(str(target)) and out[1] == version
    assert (target / "segjml" / "configs" / "train.yaml").is_file()
    assert len(list((target / "segjml" / "configs" / "experiment").glob("*.yaml"))) > 100


def test_segjml_train_from_an_empty_folder_writes_metrics(installed, tmp_path):
    target, env = installed
    proc = run([target / "bin" / "segjml-train", "trainer.max_iters=3", "trainer.progress=false"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "synthetic_demo_ce_jml"  # trainer.max_iters does not name the run
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()

    ckpt = f"ckpt='{run_dir / 'checkpoints' / 'last.pt'}'"
    evaluated = run([target / "bin" / "segjml-eval", ckpt, "limit_samples=4", "num_workers=0"], tmp_path, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert len(list((tmp_path / "outputs" / "eval").rglob("metrics.json"))) == 1


def test_python_m_tools_run_from_the_wheel(installed, tmp_path):
    target, env = installed
    validate = run([sys.executable, "-m", "segjml.data.validate", "dataset=synthetic"], tmp_path, env)
    assert validate.returncode == 0, validate.stderr[-2000:]
    assert "generated data set" in validate.stdout
    models = run([sys.executable, "-m", "segjml.models"], tmp_path, env)
    assert models.returncode == 0, models.stderr[-2000:]
    assert "dl3_r18" in models.stdout and "segformer_b0" in models.stdout


def test_script_dependencies_are_declared_in_an_extra():
    requires = metadata.requires("segjml")
    scipy = [r for r in requires if r.startswith("scipy")]
    assert scipy and all('extra == "prepare"' in r or 'extra == "dev"' in r for r in scipy)
    assert 'extra == "prepare"' in " ".join(scipy)
    assert "import scipy" in (ROOT / "scripts" / "prepare_voc_aug.py").read_text()
    scripts = {e.name for e in metadata.distribution("segjml").entry_points if e.group == "console_scripts"}
    assert scripts == {"segjml-train", "segjml-eval", "segjml-predict", "segjml-export"}
