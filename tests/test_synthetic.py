"""The synthetic data set is deterministic, holds only valid ids, and is neither trivial nor degenerate."""

import numpy as np
import torch

from segjml.data import SyntheticSegmentation
from segjml.data.synthetic import make_sample


def test_same_seed_same_samples_different_seed_different_samples():
    a, b = SyntheticSegmentation("train", 4, 64, seed=3), SyntheticSegmentation("train", 4, 64, seed=3)
    c = SyntheticSegmentation("train", 4, 64, seed=4)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(4))


def test_train_and_val_differ():
    img_train, _ = make_sample(0, "train", 0, 64)
    img_val, _ = make_sample(0, "val", 0, 64)
    assert not np.array_equal(img_train, img_val)


def test_labels_hold_only_valid_ids_and_every_class_occurs():
    counts = np.zeros(SyntheticSegmentation.num_classes + 1, dtype=np.int64)
    for i in range(60):
        image, label = make_sample(0, "train", i, 64)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert label.shape == (64, 64) and label.max() < SyntheticSegmentation.num_classes
        counts += np.bincount(label.ravel(), minlength=len(counts))[: len(counts)]
    assert counts[-1] == 0
    assert (counts[:-1] > 0).all()
    # imbalanced: the most frequent object class covers several times the area of the rarest one
    objects = counts[1:-1]
    assert objects.max() > 3 * objects.min()


def test_colour_alone_does_not_give_the_class():
    # The mean colour of two object classes overlaps: objects of a class are not one flat colour.
    _, label = make_sample(0, "train", 0, 96)
    image, label = make_sample(0, "train", 1, 96)
    for cls in np.unique(label):
        if cls == 0:
            continue
        pixels = image[label == cls].astype(float)
        assert pixels.std(0).mean() > 10  # textured, not flat
