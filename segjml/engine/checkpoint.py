"""Checkpoints written atomically and read safely (``weights_only=True``), with one-line errors.

- :func:`save_atomic` serialises in memory, checks free space, writes a temporary file in the target directory,
  fsyncs it, gives it the mode the process umask asks for, ``os.replace``-s it over the target and fsyncs the
  directory: a crash or a full disk leaves either the old file or the new one, never a half-written file.
- :func:`load_checkpoint` refuses anything that is not a segjml checkpoint with a one-line :class:`CheckpointError`.
- :func:`load_model_state` loads weights strictly and names the first tensor that does not fit.
- :func:`check_allowed_targets` refuses a stored config that would build anything but segjml's own model builder or
  data set classes; :func:`load_trained` calls the model builder with the checked values (docs/security.md).
- :func:`config_hash`, :func:`config_diff` and :func:`check_resumable_config` tell whether a checkpoint was written
  by the config a run resumes with.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from segjml.config import RUN_INDEPENDENT_KEYS
from segjml.utils.files import read_tensors


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, unsafe, written by another model or config)."""


# --------------------------------------------------------------------------------------------------------- writing

# Markers of a write error that torch wrapped in a RuntimeError (its zip writer reports failed writes this way)
_TORCH_WRITE_ERRORS = ("enforce fail", "inline_container", "No space left")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _mb(n_bytes: float) -> str:
    mb = n_bytes / 2**20
    return f"{mb:.1f}" if mb < 10 else f"{mb:.0f}"


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _disk_full(path: Path, needed: int) -> CheckpointError:
    free = _free_bytes(path.parent)
    free_text = "?" if free is None else _mb(free)
    return CheckpointError(
        f"cannot write checkpoint {path}: disk full (needs about {_mb(needed)} MB, {free_text} MB "
        f"free on {path.parent}); free space or set paths.log_dir=<another disk>"
    )


def _write_failed(path: Path, err: BaseException) -> CheckpointError:
    """A one-line error for a write that failed for another reason than a full disk."""
    if isinstance(err, OSError):
        cause = err.strerror or type(err).__name__
        if err.errno in (errno.EACCES, errno.EPERM):
            advice = f"make {path.parent} writable for this user or set paths.log_dir=<a writable directory>"
        elif err.errno == errno.EROFS:
            advice = f"{path.parent} is on a read-only file system: set paths.log_dir=<a writable directory>"
        elif err.errno == errno.EDQUOT:
            advice = "free space in your quota or set paths.log_dir=<another disk>"
        else:
            advice = f"check {path.parent} (mounted, writable) or set paths.log_dir=<another directory>"
    else:
        text = str(err).strip()
        cause = text.splitlines()[0][:200] if text else type(err).__name__
        advice = f"check {path.parent} (mounted, writable, free space) or set paths.log_dir=<another directory>"
    return CheckpointError(f"cannot write checkpoint {path}: {cause}; {advice}")


def _is_disk_full(err: BaseException, directory: Path, needed: int) -> bool:
    """ENOSPC, or a write error torch wrapped in a RuntimeError while the disk lacks the space needed."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    if not isinstance(err, RuntimeError) or not any(m in str(err) for m in _TORCH_WRITE_ERRORS):
        return False
    if "No space left" in str(err):
        return True
    free = _free_bytes(directory)  # measured after the temporary file is removed
    return free is not None and free < needed


def _is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_ERRORS)
    )


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_failed(path, err) from err
    free = _free_bytes(path.parent)
    if free is not None and free < needed:
        raise _disk_full(path, needed)

    tmp: str | None = None
    try:
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
            Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(err, path.parent, needed):
            raise _disk_full(path, needed) from err
        if _is_write_error(err):
            raise _write_failed(path, err) from err
        raise
    finally:
        buf.close()


# --------------------------------------------------------------------------------------------------------- reading

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a multi-byte character cut at the end of the sample
            return False
        text = head[: err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _first_zip_member(head: bytes) -> str | None:
    """The name in the first local file header of a zip archive (readable even when the archive is truncated)."""
    if len(head) < 30 or not head.startswith(b"PK\x03\x04"):
        return None
    name_len = int.from_bytes(head[26:28], "little")
    return head[30 : 30 + name_len].decode("utf-8", "replace")


def _safe_load_refusal(err: BaseException) -> str | None:
    """For torch's ``weights_only`` refusal: what it refused, without torch's advice to load unsafely."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"loading it would import {found.group(1)}, which is neither a tensor nor a plain value"
    return None


def _unreadable_cause(path: Path, err: BaseException) -> tuple[str, bool]:
    """``(cause, damaged)`` for a file ``torch.load(weights_only=True)`` failed on. ``damaged``: it looks like a torch
    checkpoint that was cut short or corrupted, rather than some other kind of file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as os_err:
        return os_err.strerror or type(os_err).__name__, False
    refusal = _safe_load_refusal(err)
    if size == 0:
        return "the file is empty", False
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            first = _first_zip_member(head)
            if first is not None and first.endswith("/data.pkl"):
                return "truncated or damaged: the zip archive torch.save wrote is incomplete", True
            return "a damaged zip archive, not written by torch.save", False
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "a zip archive that torch.save did not write", False
        if refusal:
            return f"it cannot be read safely: {refusal}", False
        return f"damaged: {_first_sentence(err)}", True
    if head.startswith(b"\x80"):  # a pickle: torch's legacy format or a plain Python pickle
        if refusal:
            return f"it cannot be read safely: {refusal}", False
        if "Weights only load failed" in str(err):
            return "it cannot be read safely: a Python pickle that torch.save did not write", False
        return "a Python pickle that torch.save did not write", False
    if _looks_like_text(head):
        return "a text file, not written by torch.save", False
    return "unknown binary data, not written by torch.save", False


def _first_sentence(err: BaseException) -> str:
    """The first line of torch's message, without any advice about loading the file unsafely."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    sentences = re.split(r"(?<=\.)\s+", text.splitlines()[0])
    kept = [s for s in sentences if "weights_only" not in s and "Re-running" not in s]
    line = " ".join(kept).strip() or type(err).__name__
    return line[:200]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure becomes a one-line :class:`CheckpointError`.

    A dict with a ``"model"`` entry is accepted (``iteration`` and ``config`` are optional: teacher checkpoints of
    older runs lack them). A file that is not a torch checkpoint, or whose pickle would import anything but tensors
    and plain values, gives ``checkpoint <path> is not a segjml checkpoint (<cause>)``; a truncated or damaged torch
    checkpoint gives ``checkpoint <path> cannot be read (<cause>)``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on files it is about to refuse
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = read_tensors(path, map_location)
    except Exception as err:  # unpickling errors come as many types; the cause is kept in the message
        cause, damaged = _unreadable_cause(path, err)
        cause = cause.replace("weights_only", "safe loading")  # never pass on torch's advice to load unsafely
        if damaged:
            raise CheckpointError(f"checkpoint {path} cannot be read ({cause})") from err
        raise CheckpointError(f"checkpoint {path} is not a segjml checkpoint ({cause})") from err
    if not isinstance(obj, dict) or "model" not in obj:
        held = "a dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"checkpoint {path} is not a segjml checkpoint (no 'model' entry: it holds {held})")
    return obj


def _shape(value: Any) -> str:
    return "(" + ", ".join(str(d) for d in value.shape) + ")"


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
        if key not in state_dict:
            problems.append(f"tensor '{key}' of the model is missing from the checkpoint")
        elif (
            hasattr(value, "shape")
            and hasattr(state_dict[key], "shape")
            and tuple(value.shape) != tuple(state_dict[key].shape)
        ):
            problems.append(
                f"tensor '{key}' has shape {_shape(state_dict[key])} in the checkpoint but {_shape(value)} in the model"
            )
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


# The builder a model config read from a checkpoint may call: the `_target_` of configs/model/common/base.yaml.
MODEL_TARGET = "segjml.models.build_model"

# Hydra keys that change how a node is built (positional arguments, a partial, ...); segjml's configs store none.
_HYDRA_KEYS = ("_args_", "_partial_", "_recursive_", "_convert_")


def check_allowed_targets(
    node: Any, allowed: Collection[str], source: str | os.PathLike, key: str, kind: str, built: bool = False
) -> None:
    """Refuse a config node read from a file (a checkpoint's) unless building it can only call one of ``allowed``.

    Checked before anything is imported or built: every mapping in ``node`` (``key`` is its dotted name) that holds
    ``_target_`` names one of ``allowed`` and holds no other such mapping below it (a built node's arguments are
    plain values). Hydra's ``_args_``, ``_partial_``, ``_recursive_`` and ``_convert_`` are refused anywhere, and so
    are interpolations (``${...}``): a stored config is saved resolved, and resolving one could make a node this check
    never saw. With ``built``, ``node`` itself must hold one of ``allowed``.

    Raises:
        CheckpointError: ``checkpoint <source> is refused: its config sets <dotted key>=<value>, <why>; only <allowed>
            is (are) built from a stored config, with plain values``.
    """
    allowed = tuple(allowed)

    def refuse(at: str, value: Any, why: str) -> CheckpointError:
        verb = "is" if len(allowed) == 1 else "are"
        return CheckpointError(
            f"checkpoint {source} is refused: its config sets {at}={_short(value)}, {why}; only {', '.join(allowed)} "
            f"{verb} built from a stored config, with plain values"
        )

    def walk(value: Any, at: str, inside: str | None) -> None:
        if isinstance(value, Mapping):
            if "_target_" in value:
                if value["_target_"] not in allowed:
                    raise refuse(f"{at}._target_", value["_target_"], f"which is not a segjml {kind}")
                if inside is not None:
                    raise refuse(f"{at}._target_", value["_target_"], f"a node nested in {inside}")
                inside = at
            for name, item in value.items():
                if name in _HYDRA_KEYS:
                    raise refuse(f"{at}.{name}", item, "a Hydra instantiation key")
                if name != "_target_":
                    walk(item, f"{at}.{name}", inside)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{at}[{i}]", inside)
        elif isinstance(value, str) and "${" in value:
            raise refuse(at, value, "an interpolation (a stored config is saved resolved)")

    node = _plain(node)
    if built and not (isinstance(node, Mapping) and "_target_" in node):
        at, value = (f"{key}._target_", _MISSING) if isinstance(node, Mapping) else (key, node)
        raise refuse(at, value, f"which is not a segjml {kind}")
    walk(node, key, None)


def load_trained(
    path: str | os.PathLike, device: str | torch.device = "cpu", model_cfg: Mapping[str, Any] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a segjml checkpoint, built from the model config stored in it (or ``model_cfg``), every weight
    loaded strictly, in eval mode on ``device``; and the checkpoint itself (its ``config`` is the run's config).

    The stored config is the file's, not the user's: it must pass :func:`check_allowed_targets` (only
    :data:`MODEL_TARGET`, nothing nested), and its values are passed to that builder directly, so Hydra never
    instantiates anything read from the file. ``model_cfg`` (``teacher.model=``) is the user's own and built as given.

    Raises:
        CheckpointError: unreadable file, no model config, a stored model config that would build anything else, or
            weights that do not fit the model (first tensor named).
    """
    from omegaconf import OmegaConf

    from segjml.models import build_model
    from segjml.utils import build

    state = load_checkpoint(path, map_location=device)
    if model_cfg is not None:
        node = OmegaConf.create(_plain(model_cfg))
        node.pretrained = False  # every weight comes from the checkpoint
        model = build(node)
    else:
        node = (state.get("config") or {}).get("model")
        if node is None:
            raise CheckpointError(
                f"checkpoint {path} holds no model config; give the model's config (teacher.model=...)"
            )
        check_allowed_targets(node, (MODEL_TARGET,), path, "model", "model builder", built=True)
        kwargs = {name: value for name, value in node.items() if name != "_target_"}
        model = build_model(**{**kwargs, "pretrained": False})  # every weight comes from the checkpoint
    load_model_state(model, evaluated_weights(state), f"checkpoint {path}")
    return model.to(device).eval(), state


def evaluated_weights(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights a checkpoint's run evaluated: the EMA teacher's for a semi-supervised run that evaluates its
    teacher (``ssl.evaluate=teacher``, the figure AugSeg reports), else the model's."""
    ssl = (state.get("config") or {}).get("ssl") or {}
    if state.get("ema") is not None and ssl.get("evaluate", "teacher") == "teacher":
        return state["ema"]["model"]
    return state["model"]


# --------------------------------------------------------------------------------------------------- RNG states


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch and, on a GPU, this process's CUDA generator states (``device``; each rank saves its own)
    in a form ``torch.load(weights_only=True)`` accepts. Only the process's own GPU is saved: the set of visible GPUs
    may differ when the run resumes (one GPU per task under ``CUDA_VISIBLE_DEVICES``)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`capture_rng_state` saved; the CUDA generator of ``device`` (this process's GPU). States
    must be CPU tensors (load the checkpoint with ``map_location="cpu"``)."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before the per-device format: every GPU's generator, by index
        cuda = cuda[device.index or 0] if device is not None and len(cuda) > (device.index or 0) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def find_resumable(path: Path) -> Path | None:
    """``path`` if it is a readable checkpoint, else ``None`` (a truncated or half-written file is skipped)."""
    if not path.is_file():
        return None
    try:
        load_checkpoint(path)
    except CheckpointError:
        return None
    return path


# ------------------------------------------------------------------------------------------- config fingerprints


def _plain(cfg: Any) -> Any:
    """An OmegaConf config as plain containers (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def config_hash(cfg: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``cfg`` as JSON with sorted keys (values JSON cannot hold are written with ``str``)."""
    return hashlib.sha256(json.dumps(_plain(cfg), sort_keys=True, default=str).encode()).hexdigest()


_MISSING = object()


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value; an empty mapping is a leaf (so adding or removing it counts)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normalised(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal config values: lists and tuples alike, NaN equal to NaN, ``True`` not equal to ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # a value whose == gives no single truth value
        return False


def _ignored(key: str, patterns: list[list[str]]) -> bool:
    parts = key.split(".")
    return any(len(parts) >= len(p) and all(q == "*" or q == k for q, k in zip(p, parts)) for p in patterns)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The dotted keys whose values differ between ``old`` and ``new``, sorted.

    A key present in only one of them counts as differing. ``ignore`` holds dotted prefixes: a key equal to or
    under one is skipped; a ``*`` segment matches any one segment (``trainer.*.mode``, ``trainer.eval.*``).
    """
    flat_old, flat_new = _flatten(_plain(old)), _flatten(_plain(new))
    patterns = [p.split(".") for p in ignore]
    differ = [
        key
        for key in flat_old.keys() | flat_new.keys()
        if not _ignored(key, patterns) and not _same(flat_old.get(key, _MISSING), flat_new.get(key, _MISSING))
    ]
    return sorted(differ)


def _short(value: Any) -> str:
    if value is _MISSING:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(_normalised(value), default=str)
    text = " ".join(str(text).split()) or repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resumable_config(old: Mapping[str, Any] | None, new: Mapping[str, Any], source: str) -> None:
    """Refuse to resume checkpoint ``source`` (written with config ``old``) under a different config ``new``.

    Keys of :data:`~segjml.config.RUN_INDEPENDENT_KEYS` may differ, except that ``trainer.max_iters`` may only
    grow. ``old=None`` (a checkpoint that stores no config) is not checked. Honouring
    ``trainer.allow_config_change`` and comparing ``trainer.max_iters`` with the checkpoint's iteration are left to
    the caller.

    Raises:
        CheckpointError: one line listing up to 5 differing keys with their old and new values.
    """
    if old is None:
        return
    old, new = _plain(old), _plain(new)
    differ = config_diff(old, new, RUN_INDEPENDENT_KEYS)
    flat_old, flat_new = _flatten(old), _flatten(new)
    old_iters = flat_old.get("trainer.max_iters", _MISSING)
    new_iters = flat_new.get("trainer.max_iters", _MISSING)
    if isinstance(old_iters, (int, float)) and isinstance(new_iters, (int, float)) and new_iters < old_iters:
        differ = sorted([*differ, "trainer.max_iters"])
    if not differ:
        return
    shown = ", ".join(
        f"{k} ({_short(flat_old.get(k, _MISSING))} -> {_short(flat_new.get(k, _MISSING))})" for k in differ[:5]
    )
    more = f", and {len(differ) - 5} more" if len(differ) > 5 else ""
    raise CheckpointError(
        f"checkpoint {source} was written by a different config: {shown}{more}; rerun with the "
        "old values, use a new run directory, or pass trainer.allow_config_change=true to resume "
        "anyway"
    )
