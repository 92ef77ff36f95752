"""Losses: Jaccard metric losses (JML-1/2), soft Jaccard baselines, Lovasz-Softmax, cross-entropy, the loss mix."""

from segjml.losses.criterion import SegmentationCriterion
from segjml.losses.cross_entropy import CrossEntropyLoss
from segjml.losses.jaccard import JaccardMetricLoss
from segjml.losses.lovasz import LovaszSoftmaxLoss

__all__ = ["CrossEntropyLoss", "JaccardMetricLoss", "LovaszSoftmaxLoss", "SegmentationCriterion"]
