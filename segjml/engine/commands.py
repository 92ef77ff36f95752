"""``eval.py`` and ``predict.py``: a trained segjml checkpoint on a validation split or on image files."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from segjml.engine.checkpoint import check_allowed_targets, load_trained
from segjml.engine.distributed import resolve_device


def dataset_palette(dataset_cfg: DictConfig) -> list[tuple[int, int, int]]:
    """Colours of the data set's classes (from its data set class), for colour-coded predictions.

    The class is looked up in :data:`segjml.data.DATASET_TARGETS`, never imported by name (the config is a
    checkpoint's); another class gets grey levels only.
    """
    from segjml.data import DATASET_TARGETS

    cls = DATASET_TARGETS.get(dataset_cfg.val._target_)
    palette = list(getattr(cls, "palette", []))
    n = dataset_cfg.num_classes
    if len(palette) < n:  # pad with grey levels for classes without a colour
        palette += [(int(255 * i / max(n - 1, 1)),) * 3 for i in range(len(palette), n)]
    return palette


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
    from segjml.data import build_dataset, build_loader
    from segjml.data.transforms import BatchToDevice
    from segjml.engine.inference import evaluate
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
    names = [str(n) for n in (getattr(val_set, "class_names", None) or range(data_cfg.num_classes))]
    return evaluate(
        model,
        loader,
        metrics,
        BatchToDevice(device, data_cfg.mean, data_cfg.std),
        cfg.mode,
        data_cfg.crop_size,
        flip=cfg.flip,
        scales=cfg.scales,
        output_dir=cfg.paths.output_dir,
        class_names=names,
        title=f"{(state.get('config') or {}).get('name', '')} eval",
    )


def predict_images(cfg: DictConfig) -> list[Path]:
    """``predict.py``: colour-coded prediction, overlay and confidence map of every input image."""
    import glob

    import cv2
    import matplotlib

    from segjml.data.errors import DataError
    from segjml.data.folder import read_image
    from segjml.data.transforms import BatchToDevice
    from segjml.engine.inference import predict_probs

    device = resolve_device(cfg.device)
    model, state = load_trained(cfg.ckpt, device)
    data_cfg = stored_dataset(cfg.ckpt, state)
    source = Path(str(cfg.inputs))
    files = (
        sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if source.is_dir()
        else sorted(Path(p) for p in glob.glob(str(cfg.inputs)))
    )
    if not files:
        raise DataError(f"no .jpg / .png images match inputs={cfg.inputs}")
    palette = torch.tensor(dataset_palette(data_cfg), dtype=torch.uint8)
    to_device = BatchToDevice(device, data_cfg.mean, data_cfg.std)
    colormap = matplotlib.colormaps["viridis"]
    out_dir = Path(cfg.paths.output_dir)
    written = []
    for path in files:
        image = read_image(path)
        x = to_device.images(torch.from_numpy(image).permute(2, 0, 1)[None])
        probs = predict_probs(model, x, cfg.mode, data_cfg.crop_size, flip=cfg.flip, scales=cfg.scales)[0].cpu()
        conf, pred = probs.max(0)
        colour = palette[pred].numpy()
        overlay = (cfg.overlay_alpha * colour + (1 - cfg.overlay_alpha) * image).round().astype("uint8")
        confidence = (colormap(conf.numpy())[..., :3] * 255).round().astype("uint8")
        for suffix, array in (("pred", colour), ("overlay", overlay), ("conf", confidence)):
            target = out_dir / f"{path.stem}_{suffix}.png"
            cv2.imwrite(str(target), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
            written.append(target)
    print(f"wrote predictions of {len(files)} images to {out_dir}")
    return written
