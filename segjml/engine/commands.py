"""``eval.py`` and ``predict.py``: a trained segjml checkpoint on a validation split or on image files.

- :func:`load_trained` builds the model a checkpoint was trained with (eval, predict, the distillation teacher).
- :func:`check_allowed_targets` refuses a config read from a checkpoint that would build anything but segjml's own
  model builder or data set classes; the builder is then called with the checked values (docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from segjml.config import short_value, to_plain
from segjml.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from segjml.engine.distributed import resolve_device

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

    def refuse(at: str, shown: str, why: str) -> CheckpointError:
        verb = "is" if len(allowed) == 1 else "are"
        return CheckpointError(
            f"checkpoint {source} is refused: its config sets {at}={shown}, {why}; only {', '.join(allowed)} "
            f"{verb} built from a stored config, with plain values"
        )

    def walk(value: Any, at: str, inside: str | None) -> None:
        if isinstance(value, Mapping):
            if "_target_" in value:
                target = short_value(value["_target_"])
                if value["_target_"] not in allowed:
                    raise refuse(f"{at}._target_", target, f"which is not a segjml {kind}")
                if inside is not None:
                    raise refuse(f"{at}._target_", target, f"a node nested in {inside}")
                inside = at
            for name, item in value.items():
                if name in _HYDRA_KEYS:
                    raise refuse(f"{at}.{name}", short_value(item), "a Hydra instantiation key")
                if name != "_target_":
                    walk(item, f"{at}.{name}", inside)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{at}[{i}]", inside)
        elif isinstance(value, str) and "${" in value:
            raise refuse(at, short_value(value), "an interpolation (a stored config is saved resolved)")

    node = to_plain(node)
    if built and not (isinstance(node, Mapping) and "_target_" in node):
        at, shown = (f"{key}._target_", "unset") if isinstance(node, Mapping) else (key, short_value(node))
        raise refuse(at, shown, f"which is not a segjml {kind}")
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
    from segjml.models import build_model
    from segjml.utils import build

    state = load_checkpoint(path, map_location=device)
    if model_cfg is not None:
        node = OmegaConf.create(to_plain(model_cfg))
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


def dataset_palette(dataset_cfg: DictConfig) -> list[tuple[int, int, int]]:
    """Colours of the data set's classes (from its data set class, else ``dataset.palette``), for colour-coded
    predictions.

    The class is looked up in :data:`segjml.data.DATASET_TARGETS`, never imported by name (the config is a
    checkpoint's); another class gets grey levels only.
    """
    from segjml.data import DATASET_TARGETS

    cls = DATASET_TARGETS.get(dataset_cfg.val._target_)
    palette = [tuple(c) for c in getattr(cls, "palette", [])]
    if not palette and dataset_cfg.get("palette"):  # dataset=folder: the mask colours; the first is 0's if ignored
        palette = [
            tuple(int(v) for v in c) for c in dataset_cfg.palette[int(bool(dataset_cfg.get("reduce_zero_label"))) :]
        ]
    n = dataset_cfg.num_classes
    if len(palette) < n:  # pad with grey levels for classes without a colour
        palette += [(int(255 * i / max(n - 1, 1)),) * 3 for i in range(len(palette), n)]
    return palette


def dataset_class_names(dataset_cfg: DictConfig) -> list[str]:
    """Names of the data set's classes: its data set class's ``class_names`` (looked up in
    :data:`segjml.data.DATASET_TARGETS`, as :func:`dataset_palette` does), else the config's ``class_names`` (those of
    ``dataset=folder``), else ``"0" .. "C-1"``."""
    from segjml.data import DATASET_TARGETS

    n = dataset_cfg.num_classes
    names = getattr(DATASET_TARGETS.get(dataset_cfg.val._target_), "class_names", None)
    if not names:
        listed = dataset_cfg.get("class_names")  # dataset=folder: read from dataset.classes, stored resolved
        names = listed if isinstance(listed, Sequence) and not isinstance(listed, str) else None
    names = [str(name) for name in names or ()]
    return names if len(names) == n else [str(i) for i in range(n)]


def stored_dataset(path: str, state: dict) -> DictConfig:
    """The data set config stored in checkpoint ``path`` (loaded as ``state``), once every ``_target_`` in it is one
    of segjml's data set classes (:data:`segjml.data.DATASET_TARGETS`), nothing nested, no interpolation.

    Raises:
        CheckpointError: ``checkpoint <path> is refused: its config sets dataset.val._target_=<target>, ...``.
    """
    from segjml.data import DATASET_TARGETS

    node = (state.get("config") or {}).get("dataset")
    check_allowed_targets(node, DATASET_TARGETS, path, "dataset", "data set class")
    return OmegaConf.create(node)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """``eval.py``: the checkpoint's model on the validation split of its data set (or ``cfg.dataset``)."""
    from segjml.data import build_dataset, build_loader, class_names_of
    from segjml.data.transforms import BatchToDevice
    from segjml.engine.inference import InferenceMode, evaluate, write_report
    from segjml.metrics import SegmentationMetrics

    device = resolve_device(cfg.device)
    model, state = load_trained(cfg.ckpt, device)
    data_cfg = cfg.dataset if cfg.get("dataset") else stored_dataset(cfg.ckpt, state)  # dataset=: the user's own
    if data_cfg.num_classes != model.num_classes:
        raise ValueError(
            f"the checkpoint predicts {model.num_classes} classes but dataset {data_cfg.name} has "
            f"{data_cfg.num_classes}"
        )
    val_set = build_dataset(data_cfg, "val", cfg.limit_samples)
    loader = build_loader(val_set, cfg.batch_size, False, cfg.num_workers)
    metrics = SegmentationMetrics(data_cfg.num_classes, data_cfg.ignore_index, **cfg.metrics)
    to_device = BatchToDevice(device, data_cfg.mean, data_cfg.std)
    result = evaluate(model, loader, metrics, to_device, InferenceMode.from_config(cfg, data_cfg.crop_size))
    title = f"{(state.get('config') or {}).get('name', '')} eval"
    write_report(result, metrics, cfg.paths.output_dir, class_names_of(val_set, data_cfg.num_classes), title)
    print(f"wrote {Path(cfg.paths.output_dir) / 'metrics.json'} and reliability.png")
    return result


def predict_images(cfg: DictConfig) -> list[Path]:
    """``predict.py``: colour-coded prediction, overlay and confidence map of every input image, predicted by
    :class:`~segjml.engine.segmenter.Segmenter` in the mode ``cfg`` gives (``mode``, ``flip``, ``scales``)."""
    import glob

    import cv2
    import matplotlib

    from segjml.data.errors import DataError
    from segjml.data.folder import read_image
    from segjml.engine.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(
        cfg.ckpt, cfg.device, mode=cfg.mode, flip=bool(cfg.flip), scales=list(cfg.scales)
    )
    source = Path(str(cfg.inputs))
    files = (
        sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if source.is_dir()
        else sorted(Path(p) for p in glob.glob(str(cfg.inputs)))
    )
    if not files:
        raise DataError(f"no .jpg / .png images match inputs={cfg.inputs}")
    palette = torch.tensor(segmenter.palette, dtype=torch.uint8)
    colormap = matplotlib.colormaps["viridis"]
    out_dir = Path(cfg.paths.output_dir)
    written = []
    for path in files:
        image = read_image(path)
        conf, pred = segmenter(image, return_probs=True).probs.cpu().max(0)
        colour = palette[pred].numpy()
        overlay = (cfg.overlay_alpha * colour + (1 - cfg.overlay_alpha) * image).round().astype("uint8")
        confidence = (colormap(conf.numpy())[..., :3] * 255).round().astype("uint8")
        for suffix, array in (("pred", colour), ("overlay", overlay), ("conf", confidence)):
            target = out_dir / f"{path.stem}_{suffix}.png"
            cv2.imwrite(str(target), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
            written.append(target)
    print(f"wrote predictions of {len(files)} images to {out_dir}")
    return written
