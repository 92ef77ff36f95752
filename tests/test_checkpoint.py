"""Checkpoint files: permissions, full disks, files that are not checkpoints, weights that do not fit, resumed
configs that changed."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import shutil
import zipfile
from collections import namedtuple

import pytest
import torch
from torch import nn

from segjml.config import RUN_INDEPENDENT_KEYS, check_resumable_config, config_diff, config_hash
from segjml.engine import checkpoint as ckpt
from segjml.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_atomic


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def _state(n: int = 1000) -> dict:
    return {"model": {"w": torch.randn(n)}, "iteration": 7, "config": {"seed": 0}}


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text
    return text


# ------------------------------------------------------------------------------------------------ permissions


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mode):
    path = tmp_path / "last.pt"
    obj = _state()
    old = os.umask(umask)
    try:
        save_atomic(obj, path)
        save_atomic(obj, path)  # an overwrite gets the same mode (a new file each time)
        assert os.umask(umask) == umask  # save_atomic put the umask back as it found it
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert _leftovers(tmp_path) == []
    assert torch.equal(load_checkpoint(path)["model"]["w"], obj["model"]["w"])


def test_overwrite_replaces_the_content(tmp_path):
    path = tmp_path / "best.pt"
    save_atomic({"model": {"w": torch.zeros(3)}}, path)
    save_atomic({"model": {"w": torch.ones(3)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------- full disk


def _previous(tmp_path):
    path = tmp_path / "ckpts" / "last.pt"
    save_atomic({"model": {"w": torch.arange(5.0)}, "iteration": 1}, path)
    return path, path.read_bytes()


def _size_needed(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


def test_full_disk_detected_before_writing(tmp_path, monkeypatch):
    path, before = _previous(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1, 1))
    obj = _state(3 * 2**20 // 4)  # 3 MiB of float32
    with pytest.raises(CheckpointError) as err:
        save_atomic(obj, path)
    text = _one_line(err)
    needed = _size_needed(obj) / 2**20
    assert text == (
        f"cannot write checkpoint {path}: disk full (needs about {needed:.1f} MB, 0.0 MB free on "
        f"{path.parent}); free space or set paths.log_dir=<another disk>"
    )
    assert 3.0 <= needed < 3.1
    assert path.read_bytes() == before
    assert _leftovers(path.parent) == []


class _FullDiskFile:
    """A file whose writes put half the bytes on disk, then fail as a full disk does."""

    def __init__(self, f, exc):
        self.f, self.exc = f, exc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fail_on_write(monkeypatch, exc):
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDiskFile(real_fdopen(fd, *a, **k), exc))


def _fail_on_fsync(monkeypatch, exc):
    """Delayed allocation (NFS, ext4): the full disk is reported when the data is flushed, not when it is written."""

    def fsync(fd):
        raise exc

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fail", [_fail_on_write, _fail_on_fsync], ids=["write", "fsync"])
def test_full_disk_while_writing_keeps_the_previous_file(tmp_path, monkeypatch, fail):
    path, before = _previous(tmp_path)
    exc = OSError(errno.ENOSPC, "No space left on device")
    fail(monkeypatch, exc)
    obj = _state()
    with pytest.raises(CheckpointError) as err:
        save_atomic(obj, path)
    text = _one_line(err)
    assert text.startswith(f"cannot write checkpoint {path}: disk full (needs about ")
    assert f" MB free on {path.parent}); free space or set paths.log_dir=<another disk>" in text
    assert f"needs about {_size_needed(obj) / 2**20:.1f} MB" in text
    assert isinstance(err.value.__cause__, type(exc))
    assert path.read_bytes() == before
    assert _leftovers(path.parent) == []


def test_another_write_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    path, before = _previous(tmp_path)
    _fail_on_write(monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(CheckpointError) as err:
        save_atomic(_state(), path)
    assert _one_line(err) == (
        f"cannot write checkpoint {path}: {os.strerror(errno.EIO)}; check {path.parent} (mounted, writable) or set "
        "paths.log_dir=<another directory>"
    )
    assert path.read_bytes() == before and _leftovers(path.parent) == []


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EACCES, "writable for this user"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_other_write_errors_are_one_line_with_advice(tmp_path, monkeypatch, code, advice):
    path, before = _previous(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointError) as err:
        save_atomic(_state(), path)
    text = _one_line(err)
    assert text.startswith(f"cannot write checkpoint {path}: {os.strerror(code)}; ")
    assert advice in text and "paths.log_dir=" in text and "disk full" not in text
    assert path.read_bytes() == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("a bug")], ids=["interrupt", "bug"])
def test_interrupt_or_bug_while_writing_is_raised_as_is_and_leaves_no_temporary_file(tmp_path, monkeypatch, exc):
    path, before = _previous(tmp_path)
    _fail_on_write(monkeypatch, exc)
    with pytest.raises(type(exc)) as err:
        save_atomic(_state(), path)
    assert err.value is exc
    assert path.read_bytes() == before and _leftovers(path.parent) == []


# ------------------------------------------------------------------------------------------ not a checkpoint


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _text(path):
    path.write_text("model: unet\nlr: 0.01\n")


def _random_bytes(path):
    data = random.Random(0).randbytes(4096)
    assert data[:1] not in (b"\x80", b"P")  # neither a pickle nor a zip by chance
    path.write_bytes(data)


def _plain_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/readme.txt", "not torch")


def _plain_pickle(path):
    path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=4))


def _code_pickle(path):
    path.write_bytes(pickle.dumps({"model": _RunsCode()}, protocol=2))


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (_text, "a text file"),
        (_random_bytes, "unknown binary data"),
        (_plain_zip, "a zip archive that torch.save did not write"),
        (_plain_pickle, "a Python pickle that torch.save did not write"),
        (_code_pickle, "cannot be read safely: loading it would import posix.system"),
        (_empty, "the file is empty"),
    ],
    ids=["text", "random", "zip", "pickle", "code", "empty"],
)
def test_file_that_is_not_a_checkpoint_is_one_line_without_unsafe_advice(tmp_path, make, cause):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = _one_line(err)
    assert text.startswith(f"checkpoint {path} is not a segjml checkpoint (")
    assert cause in text and text.endswith(")")
    assert "weights_only" not in text and "Re-running" not in text


def test_unsafe_object_inside_a_torch_zip_is_refused(tmp_path):
    import argparse

    path = tmp_path / "ns.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = _one_line(err)
    assert text == (
        f"checkpoint {path} is not a segjml checkpoint (it cannot be read safely: loading it would "
        "import argparse.Namespace, which is neither a tensor nor a plain value)"
    )


def test_truncated_checkpoint_cannot_be_read(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(_state(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = _one_line(err)
    assert text.startswith(f"checkpoint {path} cannot be read (truncated or damaged")
    assert "weights_only" not in text
    assert ckpt.find_resumable(path) is None


def test_missing_file_and_missing_model_entry(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint .*nope\.pt does not exist$"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"is not a segjml checkpoint \(no 'model' entry: it holds a dict\)"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"no 'model' entry: it holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")


def test_old_teacher_checkpoint_without_iteration_or_config_is_accepted(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    found, state = ckpt.find_resumable(path)
    assert found == path and torch.equal(state["model"]["w"], torch.ones(2))


def test_resume_reads_last_pt_once(tmp_path, monkeypatch):
    from segjml.engine import distributed as D
    from segjml.engine import train
    from segjml.engine import trainer as T
    from tests.helpers import compose_config

    train(compose_config(["debug=fast", "trainer.max_iters=2"], tmp_path))
    run = T.build_run(compose_config(["debug=fast", "trainer.max_iters=3"], tmp_path), *D.init_distributed("cpu"))
    loaded, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(f) or real_load(f, *a, **k))
    assert T.resume(run).iteration == 2
    assert loaded == [tmp_path / "checkpoints" / "last.pt"]


# ---------------------------------------------------------------------------------------------- model weights


class _Net(nn.Module):
    def __init__(self, classes: int = 19):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3)
        self.decoder = nn.Module()
        self.decoder.head = nn.Conv2d(8, classes, 1)


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    weights = _Net(21).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_model_state(_Net(19), weights, "teacher.pt")
    assert _one_line(err) == (
        "teacher.pt does not fit the model: tensor 'decoder.head.weight' has shape "
        "(21, 8, 1, 1) in the checkpoint but (19, 8, 1, 1) in the model (1 more tensor "
        "differs); build the model the checkpoint was trained with (its config is stored in the "
        "checkpoint)"
    )


def test_missing_and_unexpected_tensors_are_named_in_model_order():
    weights = _Net().state_dict()
    del weights["decoder.head.bias"]
    weights["aux.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_model_state(_Net(), weights, "last.pt")
    assert _one_line(err).startswith(
        "last.pt does not fit the model: tensor 'decoder.head.bias' of the model is "
        "missing from the checkpoint (1 more tensor differs); build the model"
    )
    weights = _Net().state_dict()
    weights["aux.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"^last\.pt does not fit the model: tensor 'aux\.weight' is in the "
        r"checkpoint but not in the model; build",
    ):
        load_model_state(_Net(), weights, "last.pt")
    weights = _Net().state_dict()
    del weights["encoder.weight"]
    del weights["decoder.head.weight"]
    with pytest.raises(CheckpointError, match=r"tensor 'encoder\.weight' of the model is missing"):
        load_model_state(_Net(), weights, "last.pt")


def test_matching_weights_load():
    source, target = _Net(), _Net()
    assert not torch.equal(source.encoder.weight, target.encoder.weight)
    load_model_state(target, source.state_dict(), "best.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_weights_that_are_not_a_state_dict():
    with pytest.raises(CheckpointError, match=r"^x\.pt does not fit the model: its weights are a list"):
        load_model_state(_Net(), [1, 2], "x.pt")


# ------------------------------------------------------------------------------------------- config resume


def _cfg(**trainer) -> dict:
    return {
        "seed": 0,
        "optimizer": {"lr": 0.01, "momentum": 0.9},
        "model": {"arch": "unet", "encoder": "resnet18", "aux": {"weight": 0.4}},
        "trainer": {
            "max_iters": 1000,
            "log_interval": 50,
            "num_workers": 4,
            "progress": True,
            "eval": {"mode": "whole", "scales": [1.0]},
            **trainer,
        },
        "paths": {"log_dir": "/data/a", "output_dir": "/data/a/run"},
        "logger": {"mode": "online"},
        "teacher": {"checkpoint": "/t/a.pt", "model": None},
    }


def test_config_hash_is_stable_and_order_independent():
    a, b = _cfg(), _cfg()
    b["optimizer"] = {"momentum": 0.9, "lr": 0.01}  # another insertion order
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 64
    b["optimizer"]["lr"] = 0.02
    assert config_hash(a) != config_hash(b)


def test_config_diff_reports_changed_added_and_removed_nested_keys():
    old, new = _cfg(), _cfg()
    new["optimizer"]["lr"] = 0.02
    del new["model"]["aux"]["weight"]
    new["model"]["aux"]["layers"] = [3]
    new["trainer"]["eval"]["scales"] = [1.0, 1.5]
    new["extra"] = {"a": {"b": 1}}
    assert config_diff(old, new, ()) == [
        "extra.a.b",
        "model.aux.layers",
        "model.aux.weight",
        "optimizer.lr",
        "trainer.eval.scales",
    ]
    assert config_diff(old, new, ["model", "extra"]) == ["optimizer.lr", "trainer.eval.scales"]
    assert config_diff(old, new, ["trainer.eval.*", "*.aux", "extra.a.b"]) == ["optimizer.lr"]
    assert config_diff(old, old, ()) == []


def test_config_diff_compares_values_exactly():
    assert config_diff({"a": (1, 2)}, {"a": [1, 2]}, ()) == []
    assert config_diff({"a": float("nan")}, {"a": float("nan")}, ()) == []
    assert config_diff({"a": True}, {"a": 1}, ()) == ["a"]
    assert config_diff({"a": {}}, {}, ()) == ["a"]
    assert config_diff({"a": 1}, {"a": {"b": 1}}, ()) == ["a", "a.b"]
    assert config_diff({"ab": 1}, {"ab": 2}, ["a"]) == ["ab"]  # a prefix is a whole segment


def test_resume_with_a_different_lr_is_refused_with_both_values():
    old, new = _cfg(), _cfg()
    new["optimizer"]["lr"] = 0.02
    with pytest.raises(CheckpointError) as err:
        check_resumable_config(old, new, "runs/x/last.pt")
    assert _one_line(err) == (
        "checkpoint runs/x/last.pt was written by a different config: optimizer.lr (0.01 -> "
        "0.02); rerun with the old values, use a new run directory, or pass "
        "trainer.allow_config_change=true to resume anyway"
    )


def test_resume_ignores_the_keys_that_may_change():
    old, new = (
        _cfg(),
        _cfg(log_interval=10, num_workers=0, progress=False, max_iters=2000, resume="x.pt", allow_config_change=True),
    )
    new["paths"] = {"log_dir": "/other/disk", "output_dir": "/other/disk/run"}
    new["logger"] = {"mode": "disabled", "tags": ["a"]}
    new["teacher"]["checkpoint"] = "/moved/a.pt"
    assert config_diff(old, new, ()) != []
    check_resumable_config(old, new, "last.pt")  # max_iters grew: allowed
    assert {"trainer.max_iters", "paths", "logger"} <= set(RUN_INDEPENDENT_KEYS)


def test_resume_with_fewer_iterations_is_refused():
    with pytest.raises(CheckpointError) as err:
        check_resumable_config(_cfg(), _cfg(max_iters=500), "last.pt")
    assert "different config: trainer.max_iters (1000 -> 500); rerun" in _one_line(err)


def test_resume_reports_added_and_removed_keys_at_most_five_and_shortens_values():
    old, new = _cfg(), _cfg()
    del new["model"]["aux"]
    new["model"]["arch"] = "deeplabv3plus_" + "x" * 60
    new["model"]["extra"] = 1
    new["seed"] = 1
    new["optimizer"] = {"lr": 0.1, "momentum": 0.0}
    new["trainer"]["eval"]["mode"] = "slide"
    with pytest.raises(CheckpointError) as err:
        check_resumable_config(old, new, "last.pt")
    text = _one_line(err)
    assert (
        "different config: model.arch (unet -> deeplabv3plus_xxxxxxxxxxxxxxxxxxxxxxx...), model.aux.weight "
        "(0.4 -> unset), model.extra (unset -> 1), optimizer.lr (0.01 -> 0.1), optimizer.momentum (0.9 -> 0.0), "
        "and 2 more; rerun"
    ) in text
    assert "seed" not in text and "slide" not in text


def test_checkpoint_without_config_is_not_checked():
    check_resumable_config(None, _cfg(), "teacher.pt")
