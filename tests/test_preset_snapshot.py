"""Every preset resolves to the values of ``tests/data/preset_snapshot.json``, except the differences listed here.

The snapshot was written by ``scripts/preset_snapshot.py`` from the configs before the groups were reorganised (one
place for the trainer defaults, a shared data set base, the BLS rule in the BLS losses, the teacher path from a
resolver, one metrics group). A reorganisation must not change what a preset resolves to; a change made on purpose is
listed in :data:`INTENDED`, key by key. The snapshot itself is never regenerated to make this test pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from scripts.preset_snapshot import presets, resolved
from segjml.config import CONFIG_DIR
from tests.helpers import ROOT

SNAPSHOT = json.loads((ROOT / "tests" / "data" / "preset_snapshot.json").read_text())
PRESETS = presets(CONFIG_DIR)
MISSING = "<missing>"  # the value of a key a preset does not have

# Presets that did not exist when the snapshot was written: new preset -> the snapshot preset it resolves as.
NEW_PRESETS = {
    "metrics=default": "train",  # the metrics block of train.yaml / eval.yaml became the `metrics` group
}


# Presets added after the snapshot with nothing in it to resolve as: their own tests check them
# (dataset=folder: tests/test_folder_dataset.py; the loggers: tests/test_loggers.py; and the generic config tests of
# tests/test_configs.py).
ADDED_PRESETS = {
    "dataset=folder",
    "eval dataset=folder",
    "optimizer=folder",
    "recipe=folder",
    "logger=tensorboard",
    "logger=mlflow",
}


def _bls_presets_without_rule(name: str) -> bool:
    """The BLS loss options chosen without a preset: they now bring the authors' rule (``strict_ignore: true``)."""
    return name in ("loss=ce_bls", "loss=ce_jml_bls")


def _in_snapshot(key: str, value) -> Callable[[str], bool]:
    """The presets whose snapshot holds ``value`` at ``key``."""
    return lambda name: _flat(SNAPSHOT[NEW_PRESETS.get(name, name)]).get(key) == json.dumps(value)


def _jml_loss(name: str) -> bool:
    """The presets with a loss whose IoU term is JML (every loss but Lovasz-Softmax)."""
    return (SNAPSHOT[NEW_PRESETS.get(name, name)].get("loss") or {}).get("iou_loss") == "jml"


# The differences made on purpose: (which presets, dotted key, new value). "Which presets" is a predicate on the
# preset's name; MISSING as the new value means the key is gone.
INTENDED: list[tuple[Callable[[str], bool], str, object]] = [
    # The paper's BLS rule is the default of the BLS losses (loss/ce_bls.yaml, loss/ce_jml_bls.yaml): every paper
    # preset set it one by one and keeps it, the synthetic and claims presets opt out and keep false; only the two
    # loss options chosen on the command line without a preset change.
    (_bls_presets_without_rule, "loss.bls.strict_ignore", True),
    # The typed loss schema (segjml.losses.schema, through loss/common/criterion.yaml) writes out every key of the
    # loss with the default the code used when it was absent, and reads loss.bls.kernel_size as a float (k = inf is
    # plain label smoothing): the same loss, spelt in full.
    (_jml_loss, "loss.jml.class_weights", None),
    (_jml_loss, "loss.jml.class_weights_mode", "scaled"),
    (_jml_loss, "loss.lovasz_weight", 0.0),
    (_in_snapshot("loss.iou_loss", "lovasz"), "loss.jml", None),  # Lovasz-Softmax: no JML options, no JML term
    (_in_snapshot("loss.iou_loss", "lovasz"), "loss.jml_weight", 0.0),
    (_in_snapshot("loss.bls.kernel_size", 3), "loss.bls.kernel_size", 3.0),
    (_in_snapshot("loss.bls.kernel_size", "inf"), "loss.bls.kernel_size", math.inf),
]


def _flat(node, prefix: str = "") -> dict[str, str]:
    """Dotted key -> JSON of the value, for every leaf (a list or an empty dict is a leaf). JSON tells 30 from 30.0."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def expected(name: str) -> dict[str, str]:
    """The flat snapshot of preset ``name`` with the intended differences applied."""
    flat = _flat(SNAPSHOT[NEW_PRESETS.get(name, name)])
    for applies, key, value in INTENDED:
        if applies(name):
            if value is MISSING:
                flat.pop(key, None)
            else:
                flat[key] = json.dumps(value, sort_keys=True)
    return flat


def differences(want: dict[str, str], got: dict[str, str]) -> list[str]:
    """One line per key whose value differs: ``key: expected <value>, got <value>``."""
    return [
        f"{key}: expected {want.get(key, MISSING)}, got {got.get(key, MISSING)}"
        for key in sorted(set(want) | set(got))
        if want.get(key, MISSING) != got.get(key, MISSING)
    ]


@pytest.fixture(scope="module")
def configs(preset_configs):
    """Every preset of the current tree, composed once: name -> config (output directory: the run directory)."""
    assert set(preset_configs) == set(PRESETS)
    return preset_configs


def test_every_preset_is_in_the_snapshot_or_listed_as_new():
    assert set(PRESETS) - set(NEW_PRESETS) - ADDED_PRESETS == set(SNAPSHOT), (
        "a preset was added or removed: list it in NEW_PRESETS or ADDED_PRESETS"
    )
    assert ADDED_PRESETS <= set(PRESETS)
    assert set(NEW_PRESETS) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - ADDED_PRESETS))
def test_preset_resolves_as_in_the_snapshot_except_the_intended_differences(name, configs):
    diff = differences(expected(name), _flat(resolved(configs[name])))
    assert not diff, f"{name} resolves differently from the snapshot (with INTENDED applied):\n" + "\n".join(diff)


def test_every_intended_difference_is_a_difference():
    """An entry of INTENDED that matches no preset, or gives a preset the value it had, lists nothing."""
    for applies, key, value in INTENDED:
        names = [n for n in PRESETS if n not in ADDED_PRESETS and applies(n)]
        assert names, f"INTENDED {key}: no preset"
        for name in names:
            before = _flat(SNAPSHOT[NEW_PRESETS.get(name, name)]).get(key, MISSING)
            assert before != (MISSING if value is MISSING else json.dumps(value)), f"{name}: {key} was already that"


def test_every_experiment_has_its_own_name_and_run_directory(configs):
    experiments = {name.split("=", 1)[1]: cfg for name, cfg in configs.items() if name.startswith("experiment=")}
    assert all(cfg.name == name for name, cfg in experiments.items())
    dirs = {cfg.paths.output_dir for cfg in experiments.values()}
    assert len(dirs) == len(experiments)


def test_a_difference_names_the_key_and_both_values():
    want = _flat({"trainer": {"max_iters": 40000, "eval": {"flip": False}}, "seed": 0})
    got = _flat({"trainer": {"max_iters": 40000.0, "eval": {"flip": False}}, "name": "x"})
    assert differences(want, got) == [
        f'name: expected {MISSING}, got "x"',
        f"seed: expected 0, got {MISSING}",
        "trainer.max_iters: expected 40000, got 40000.0",
    ]
