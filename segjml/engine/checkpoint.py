"""Checkpoints written atomically and read safely (``weights_only=True``), with one-line errors.

:func:`save_atomic` leaves the old file or the new one, never a half-written file, even on a full disk;
:func:`load_checkpoint` says in one line what a file that is not a segjml checkpoint is (judged from its own first
bytes and the type of torch's error); :func:`load_model_state` loads weights strictly, naming a tensor that misfits.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import pickletools
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segjml.utils.files import read_tensors


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, unsafe, written by another model or config)."""


# --------------------------------------------------------------------------------------------------------- writing


def _umask() -> int:
    os.umask(old := os.umask(0))  # the only way to read it is to set it
    return old


def _mb(n_bytes: float) -> str:
    mb = n_bytes / 2**20
    return f"{mb:.1f}" if mb < 10 else f"{mb:.0f}"


def _free_bytes(directory: Path) -> int | None:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(directory).free
    return None


def _disk_full(path: Path, needed: int, free: int | None) -> CheckpointError:
    return CheckpointError(
        f"cannot write checkpoint {path}: disk full (needs about {_mb(needed)} MB, "
        f"{'?' if free is None else _mb(free)} MB free on {path.parent}); "
        "free space or set paths.log_dir=<another disk>"
    )


def _write_failed(path: Path, err: OSError, needed: int) -> CheckpointError:
    """A one-line error for a write the operating system refused; ``ENOSPC`` is a full disk."""
    if err.errno == errno.ENOSPC:
        return _disk_full(path, needed, _free_bytes(path.parent))
    if err.errno in (errno.EACCES, errno.EPERM):
        advice = f"make {path.parent} writable for this user or set paths.log_dir=<a writable directory>"
    elif err.errno == errno.EROFS:
        advice = f"{path.parent} is on a read-only file system: set paths.log_dir=<a writable directory>"
    elif err.errno == errno.EDQUOT:
        advice = "free space in your quota or set paths.log_dir=<another disk>"
    else:
        advice = f"check {path.parent} (mounted, writable) or set paths.log_dir=<another directory>"
    return CheckpointError(f"cannot write checkpoint {path}: {err.strerror or type(err).__name__}; {advice}")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically.

    ``obj`` is serialised in memory first (so its size is known), then written to a temporary file in the same
    directory, fsynced, given mode ``0o666 & ~umask`` (``mkstemp`` makes ``0o600`` files) and ``os.replace``-d over
    ``path``; the directory is fsynced last. A crash leaves either the old file or the new one, never a half-written
    file, and a failed write leaves no temporary file behind.

    Raises:
        CheckpointError: one line, for a full disk (with the size needed and the space free) or another write error
            (permission denied, read-only file system, ...); the previous file at ``path`` is left untouched.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)  # a failure here is a programming error (an object torch cannot save), not the disk's
    needed = buf.seek(0, io.SEEK_END)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = _free_bytes(path.parent)
        if free is not None and free < needed:
            raise _disk_full(path, needed, free)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f, buf.getbuffer() as data:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # before measuring the free space of a full disk
        if isinstance(err, OSError):
            raise _write_failed(path, err, needed) from err
        raise


# --------------------------------------------------------------------------------------------------------- reading


def _first_import(path: Path) -> str | None:
    """``module.name`` of the first global the pickle at the start of ``path`` would import (read, never run)."""
    strings: list[str] = []
    with contextlib.suppress(Exception), open(path, "rb") as f:  # a damaged pickle: what comes before the damage
        for opcode, arg, _ in pickletools.genops(f):
            if opcode.name in ("GLOBAL", "INST", "STACK_GLOBAL"):  # "module name"; protocol 4+: the last two strings
                return arg.replace(" ", ".") if arg else ".".join(strings[-2:])
            if isinstance(arg, str):
                strings.append(arg)
    return None


def _unsafe_import(path: Path) -> str | None:
    """The first global of a ``torch.save`` archive that ``weights_only=True`` refuses (torch's own allowlist)."""
    with contextlib.suppress(Exception):  # an archive torch cannot open
        return min(torch.serialization.get_unsafe_globals_in_checkpoint(path), default=None)
    return None


def _zip_names(path: Path) -> list[str] | None:
    """The names in a zip archive; ``None`` for one that cannot be opened (cut short, damaged)."""
    with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError), zipfile.ZipFile(path) as archive:
        return archive.namelist()
    return None


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """Why ``torch.load`` failed on ``path``: from the file's first bytes and the error's type; torch's own words
    (the first sentence of its message) only for a torch archive that is cut short or damaged."""
    not_ours = f"checkpoint {path} is not a segjml checkpoint"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as os_err:
        return CheckpointError(f"{not_ours} ({os_err.strerror or type(os_err).__name__})")
    unsafe = "it cannot be read safely: loading it would import {}, which is neither a tensor nor a plain value"
    if not head:
        cause = "the file is empty"
    elif head.startswith(b"\x80"):  # a pickle's PROTO opcode; torch.save writes zip archives (since torch 1.6)
        imported = _first_import(path) if isinstance(err, pickle.UnpicklingError) else None
        cause = unsafe.format(imported) if imported else "a Python pickle that torch.save did not write"
    elif not head.startswith(b"PK\x03\x04"):
        text = all(c.isprintable() or c in "\t\n\r\f\v" for c in head.decode("utf-8", "ignore"))
        cause = f"{'a text file' if text else 'unknown binary data'}, not written by torch.save"
    elif isinstance(err, pickle.UnpicklingError) and (imported := _unsafe_import(path)):
        cause = unsafe.format(imported)
    elif (names := _zip_names(path)) is not None and not any(n.endswith("data.pkl") for n in names):
        cause = "a zip archive that torch.save did not write"
    else:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].removesuffix(".")[:200]
        return CheckpointError(f"checkpoint {path} cannot be read (truncated or damaged: {first})")
    return CheckpointError(f"{not_ours} ({cause})")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure becomes a one-line :class:`CheckpointError`.

    A dict with a ``"model"`` entry is accepted (``iteration`` and ``config`` are optional: teacher checkpoints of
    older runs lack them). A file that is not a torch checkpoint, or whose pickle would import anything but tensors
    and plain values, gives ``checkpoint <path> is not a segjml checkpoint (<cause>)``; a truncated or damaged torch
    checkpoint gives ``checkpoint <path> cannot be read (truncated or damaged: <torch's first sentence>)``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on files it is about to refuse
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = read_tensors(path, map_location)
    except Exception as err:  # unpickling errors come as many types; the cause is kept in the message
        raise _unreadable(path, err) from err
    if not isinstance(obj, dict) or "model" not in obj:
        held = "a dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"checkpoint {path} is not a segjml checkpoint (no 'model' entry: it holds {held})")
    return obj


def find_resumable(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """``path`` and its checkpoint (on the CPU; a resume reads the file once) if it is readable, else ``None``."""
    try:
        return path, load_checkpoint(path, map_location="cpu")
    except CheckpointError:
        return None


# ----------------------------------------------------------------------------------------------------- weights


def _shape(value: Any) -> str | None:
    return "(" + ", ".join(str(d) for d in value.shape) + ")" if hasattr(value, "shape") else None


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly.

    Keys and shapes are compared first, so the error names the same tensor every time: the first of the model's
    tensors (in its ``state_dict`` order) that is missing or has another shape, else the first unexpected tensor.

    Raises:
        CheckpointError: ``<source> does not fit the model: tensor '<name>' ...; build the model the checkpoint was
            trained with (its config is stored in the checkpoint)``.
    """
    advice = "build the model the checkpoint was trained with (its config is stored in the checkpoint)"
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{source} does not fit the model: its weights are a {type(state_dict).__name__}, "
            f"not a state dict; {advice}"
        )
    expected = model.state_dict()
    problems: list[str] = []
    for key, value in expected.items():
        ours, theirs = _shape(value), _shape(state_dict.get(key))
        if key not in state_dict:
            problems.append(f"tensor '{key}' of the model is missing from the checkpoint")
        elif None not in (ours, theirs) and ours != theirs:
            problems.append(f"tensor '{key}' has shape {theirs} in the checkpoint but {ours} in the model")
    problems += [
        f"tensor '{key}' is in the checkpoint but not in the model" for key in state_dict if key not in expected
    ]
    if problems:
        n = len(problems) - 1
        more = f" ({n} more {'tensor differs' if n == 1 else 'tensors differ'})" if n else ""
        raise CheckpointError(f"{source} does not fit the model: {problems[0]}{more}; {advice}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # what the comparison cannot see (e.g. a value of another type)
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"{source} does not fit the model: {detail[:200]}; {advice}") from err
