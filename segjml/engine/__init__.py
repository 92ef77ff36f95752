"""Training loop, evaluation, checkpoints, optimisation."""

from segjml.engine.inference import InferenceMode, evaluate, predict_probs, slide_logits
from segjml.engine.trainer import train

__all__ = ["InferenceMode", "evaluate", "predict_probs", "slide_logits", "train"]
