"""Label utilities: boundary maps and soft-label makers (BLS, LS, knowledge-distillation targets)."""

from segjml.labels.boundary import boundary_map, near_ignore_map
from segjml.labels.soft_labels import SmoothedLabels, boundary_label_smoothing, distillation_targets, label_smoothing

__all__ = [
    "SmoothedLabels",
    "boundary_label_smoothing",
    "boundary_map",
    "distillation_targets",
    "label_smoothing",
    "near_ignore_map",
]
