"""JML-SSL pieces (segjml.ssl): EMA teacher, labeled / unlabeled splits, AugSeg augmentations, the eq. 62-64 loss.

Expected values are computed here from the definitions (docs/ssl.md, paper Appendix I, the JML-1 formula of
REFERENCE.md), never copied from the code's output. Tensors are tiny; every random source is seeded.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segjml.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segjml.ssl import (
    EMATeacher,
    SSLLoss,
    adaptive_cutmix,
    image_confidence,
    labeled_indices,
    read_split_file,
    split_size,
    strong_intensity_augment,
    unlabeled_indices,
)
from segjml.ssl.augment import INTENSITY_OPS, _beta

IGNORE = 255
MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalise(images_255: torch.Tensor) -> torch.Tensor:
    return (images_255 - MEAN) / STD


def denormalise(images: torch.Tensor) -> torch.Tensor:
    return images * STD + MEAN


# -- EMA teacher ----------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv -> BN -> conv, returning segjml's output dict."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(torch.relu(self.bn(self.conv(x))))}


def set_student(student: nn.Module, value: float, tracked: int) -> None:
    """Every parameter and float buffer of ``student`` to ``value``, BN's batch counter to ``tracked``."""
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(value)
        for b in student.buffers():
            b.fill_(tracked if not b.is_floating_point() else value)


def test_ema_teacher_is_a_frozen_float32_copy_in_eval_mode():
    torch.manual_seed(0)
    student = TinyNet().double().train()
    teacher = EMATeacher(student)
    assert teacher.decay == 0.999 and teacher.warmup is False and teacher.num_updates == 0
    assert not teacher.model.training
    for (name, t), s in zip(teacher.model.state_dict().items(), student.state_dict().values()):
        assert t.dtype == (torch.float32 if s.is_floating_point() else s.dtype), name
        assert torch.equal(t, s.to(t.dtype)), name
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    assert teacher.model.conv.weight.data_ptr() != student.conv.weight.data_ptr()


def test_ema_update_follows_the_closed_form():
    """Student held at s: after n updates a weight is d^n t0 + (1 - d^n) s; integer buffers are copied."""
    torch.manual_seed(0)
    student = TinyNet()
    teacher = EMATeacher(student, decay=0.9)
    t0 = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    set_student(student, 2.0, tracked=7)
    n = 5
    for _ in range(n):
        teacher.update(student)
    assert teacher.num_updates == n
    d = 0.9**n
    for name, value in teacher.model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == 7
        else:
            torch.testing.assert_close(value, d * t0[name] + (1 - d) * 2.0, rtol=1e-6, atol=1e-6)


def test_ema_warmup_decays_0_half_two_thirds_then_the_cap():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = EMATeacher(student, decay=0.7, warmup=True)
    decays = []
    for step in range(5):
        decays.append(teacher.current_decay())
        set_student(student, float(step + 1), tracked=step)
        before = teacher.model.conv.weight.detach().clone()
        teacher.update(student)
        d = decays[-1]
        torch.testing.assert_close(teacher.model.conv.weight, d * before + (1 - d) * float(step + 1))
    assert decays == pytest.approx([0.0, 0.5, 2 / 3, 0.7, 0.7])
    # the first update (decay 0) made the teacher the student; here, after 5, the average of 1..5 with those weights
    expected = 1.0
    for step, d in enumerate(decays[1:], start=2):
        expected = d * expected + (1 - d) * step
    torch.testing.assert_close(teacher.model.head.bias, torch.full((3,), expected))


def test_ema_resume_continues_exactly():
    torch.manual_seed(0)
    student = TinyNet()
    a = EMATeacher(student, decay=0.95, warmup=True)
    values = [0.5, -1.0, 3.0, 0.25, 2.0]
    for v in values[:3]:
        set_student(student, v, tracked=1)
        a.update(student)
    state = copy.deepcopy(a.state_dict())
    torch.manual_seed(1)
    b = EMATeacher(TinyNet(), decay=0.95, warmup=True)  # other weights, step 0: everything must come from the state
    b.load_state_dict(state)
    assert b.num_updates == 3
    for v in values[3:]:
        set_student(student, v, tracked=2)
        a.update(student)
        b.update(student)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="decay=0.95.*decay=0.9"):
        EMATeacher(student, decay=0.9, warmup=True).load_state_dict(state)


def test_ema_update_is_the_same_whatever_the_global_random_state():
    """DDP: ranks with identical students get identical teachers (the update draws no random numbers)."""
    torch.manual_seed(0)
    student = TinyNet()
    teachers = [EMATeacher(student, decay=0.8) for _ in range(2)]
    set_student(student, 1.5, tracked=3)
    for seed, teacher in zip((11, 12), teachers):
        torch.manual_seed(seed)
        teacher.update(student)
    for x, y in zip(teachers[0].model.state_dict().values(), teachers[1].model.state_dict().values()):
        assert torch.equal(x, y)


def test_ema_predict_uses_running_statistics_and_no_gradient():
    class BNOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return {"out": self.bn(x)}

    student = BNOnly()
    with torch.no_grad():
        student.bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        student.bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    teacher = EMATeacher(student)
    teacher.model.train()  # predict must switch to eval mode whatever state the module was left in
    x = torch.randn(2, 3, 4, 4, generator=gen(0), requires_grad=True)
    out = teacher.predict(x)
    mean = torch.tensor([1.0, -2.0, 0.5])[:, None, None]
    var = torch.tensor([4.0, 0.25, 1.0])[:, None, None]
    torch.testing.assert_close(out, (x.detach() - mean) / torch.sqrt(var + 1e-5))
    assert not out.requires_grad and out.dtype == torch.float32
    assert torch.equal(teacher.model.bn.running_mean, torch.tensor([1.0, -2.0, 0.5]))  # no stats update


def test_ema_refuses_a_wrapped_student_and_a_mismatched_one():
    class Compiled(nn.Module):  # what torch.compile's wrapper looks like to unwrap_model
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    with pytest.raises(ValueError, match="unwrap_model"):
        EMATeacher(Compiled(TinyNet()))
    with pytest.raises(ValueError, match="unwrap_model"):
        EMATeacher(nn.DataParallel(TinyNet()))
    teacher = EMATeacher(TinyNet(3))
    with pytest.raises(ValueError, match="do not match"):
        teacher.update(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(TinyNet(), decay=1.5)


def test_ema_fused_update_equals_the_per_tensor_formula():
    """The foreach update against ``t <- d t + (1 - d) s`` written tensor by tensor, in float64 (BatchNorm's running
    statistics included, its batch counter copied), over a warm-up schedule and a student that changes each step."""
    torch.manual_seed(0)
    student = TinyNet().double().train()
    teacher = EMATeacher(student, decay=0.9, warmup=True)
    teacher.model.double()  # float64 on both sides: the two formulas then agree to 1e-12
    expected = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for step in range(4):
        optimizer.zero_grad()
        student(torch.randn(2, 3, 6, 6, generator=gen(step), dtype=torch.float64))["out"].square().mean().backward()
        optimizer.step()  # new weights, and new BatchNorm running statistics from the forward pass
        d = teacher.current_decay()
        for name, s in student.state_dict().items():
            expected[name] = d * expected[name] + (1 - d) * s if s.is_floating_point() else s.clone()
        teacher.update(student)
    assert teacher.num_updates == 4 and int(teacher.model.bn.num_batches_tracked) == 4
    for name, value in teacher.model.state_dict().items():
        assert value.dtype == expected[name].dtype, name
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-12, msg=name)


def test_ema_decay_is_augsegs_schedule_through_model_ema_v3():
    """With warm-up, ModelEmaV3's ``1 - (1 + (step - 1) / gamma) ** -power`` at gamma = power = 1 and step = n + 1 is
    AugSeg's ``min(decay, 1 - 1 / (n + 1))`` bit for bit; timm's own defaults are not (power 2/3), and without
    warm-up a step passed to ModelEmaV3 would make the first update a copy, so none is passed."""
    from timm.utils import ModelEmaV3

    student = TinyNet()
    teacher = EMATeacher(student, decay=0.999, warmup=True)
    for n in range(100_000):
        teacher.num_updates = n
        assert teacher.current_decay() == min(0.999, 1.0 - 1.0 / (n + 1)), n
    timm_default = ModelEmaV3(student, decay=0.999, use_warmup=True)  # warmup_power = 2/3
    assert timm_default.get_decay(2) == pytest.approx(1 - 2 ** (-2 / 3)) and 1 - 2 ** (-2 / 3) < 0.5
    assert EMATeacher(student, decay=0.9).current_decay() == 0.9  # AugSeg without warm-up: decay from update 1
    assert ModelEmaV3(student, decay=0.9).get_decay(1) == 0.0 and ModelEmaV3(student, decay=0.9).get_decay() == 0.9


# -- splits -----------------------------------------------------------------------------------------------------------


def test_split_size_gives_the_published_split_sizes():
    # U2PL / AugSeg: VOC train_aug (10582) at 1/16 .. 1/2, Cityscapes (2975) at 1/16 .. 1/2
    assert [split_size(10582, f) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2)] == [662, 1323, 2646, 5291]
    assert [split_size(2975, f) for f in ("1/16", "1/8", "1/4", "1/2")] == [186, 372, 744, 1488]
    assert split_size(10582, 92) == 92 and split_size(9, 1 / 3) == 3 and split_size(5, 1.0) == 5
    for bad in (0, 11, 1.5, 0.0, True, "half"):
        with pytest.raises(ValueError, match="labeled="):
            split_size(10, bad)


@pytest.mark.parametrize("labeled", [7, 0.25, "1/8"])
def test_labeled_indices_are_the_seeded_permutation_head_and_unlabeled_the_rest(labeled):
    n = 40
    k = {7: 7, 0.25: 10, "1/8": 5}[labeled]
    picked = labeled_indices(n, labeled, seed=3)
    expected = sorted(torch.randperm(n, generator=gen(3))[:k].tolist())
    assert picked == expected and len(picked) == k
    assert labeled_indices(n, labeled, seed=3) == picked  # deterministic
    assert labeled_indices(n, labeled, seed=4) != picked
    rest = unlabeled_indices(n, picked)
    assert rest == sorted(rest) and not set(rest) & set(picked)
    assert sorted(rest + picked) == list(range(n))


def imbalanced_presence(n: int = 400, seed: int = 0) -> np.ndarray:
    """Class 0 everywhere (like VOC's background), classes 1-4 in 50%, 10%, 3%, 1% of the images."""
    rng = np.random.default_rng(seed)
    presence = np.zeros((n, 5), dtype=bool)
    presence[:, 0] = True
    for c, share in zip(range(1, 5), (0.5, 0.10, 0.03, 0.01)):
        presence[rng.choice(n, int(share * n), replace=False), c] = True
    return presence


def test_balanced_split_beats_random_picks_on_an_imbalanced_set():
    presence = imbalanced_presence()
    n, k = len(presence), 40
    balanced = labeled_indices(n, k, seed=0, class_presence=presence)
    assert len(balanced) == k == len(set(balanced)) and balanced == sorted(balanced)
    assert balanced == labeled_indices(n, k, seed=0, class_presence=torch.from_numpy(presence))
    counts = presence[balanced].sum(0)
    # the greedy rule raises the rarest class first: all 4 images of class 4 and all 12 of class 3 are picked
    assert counts[4] == 4 and counts[3] == 12

    def evenness(c: np.ndarray) -> float:  # entropy of the class counts, log(5) when all are equal
        q = c[c > 0] / c.sum()
        return float(-(q * np.log(q)).sum())

    for seed in range(20):
        random_counts = presence[labeled_indices(n, k, seed=seed)].sum(0)
        assert random_counts.min() < counts.min()
        assert (random_counts[2:] <= counts[2:]).all()  # every rare class holds at least as many images
        assert evenness(random_counts) < evenness(counts)
    rest = unlabeled_indices(n, balanced)
    assert sorted(rest + balanced) == list(range(n))


@pytest.mark.parametrize("seed", range(5))
def test_balanced_split_represents_every_class_when_it_can(seed):
    rng = np.random.default_rng(seed)
    presence = rng.random((60, 8)) < 0.05
    presence[rng.integers(60, size=8), np.arange(8)] = True  # every class in at least one image
    picked = labeled_indices(60, 8, seed=seed, class_presence=presence)
    assert presence[picked].any(0).all()


def test_balanced_split_takes_classless_images_last_and_refuses_bad_shapes():
    presence = np.zeros((6, 2), dtype=bool)
    presence[4, 1] = True
    presence[1, 0] = True
    picked = labeled_indices(6, 3, seed=0, class_presence=presence)
    order = torch.randperm(6, generator=gen(0)).tolist()
    first_classless = next(i for i in order if i not in (1, 4))
    assert picked == sorted([1, 4, first_classless])
    with pytest.raises(ValueError, match="class_presence has shape"):
        labeled_indices(6, 3, class_presence=np.zeros((5, 2), dtype=bool))


def test_read_split_file_accepts_published_formats(tmp_path):
    ids = [
        f"/data/VOC2012/JPEGImages/{name}.jpg"
        for name in ("2007_000032", "2007_000039", "2007_000063", "2010_004493", "2011_003271")
    ]
    split = tmp_path / "92.txt"
    split.write_text(
        "2010_004493\n"  # the U2PL / AugSeg format
        "\n"
        "JPEGImages/2007_000032.jpg\n"  # a path prefix and a suffix
        "2007_000063.jpg SegmentationClass/2007_000063.png"  # two columns, no final newline
    )
    assert read_split_file(split, ids) == [0, 2, 3]
    city = tmp_path / "186.txt"
    city.write_text("leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png\n")
    city_ids = ["aachen_000000_000019_leftImg8bit", "jena_000078_000019_leftImg8bit"]
    assert read_split_file(city, city_ids) == [1]


def test_read_split_file_errors_are_one_line_and_name_the_id(tmp_path):
    ids = ["2007_000032", "2007_000039"]
    split = tmp_path / "labeled.txt"
    split.write_text("2007_000032\n2008_999999\n")
    with pytest.raises(ValueError, match=r"line 2 names image '2008_999999'") as err:
        read_split_file(split, ids)
    assert "\n" not in str(err.value)
    split.write_text("2007_000032\n2007_000032.jpg\n")
    with pytest.raises(ValueError, match="twice"):
        read_split_file(split, ids)
    with pytest.raises(ValueError, match="does not exist"):
        read_split_file(tmp_path / "missing.txt", ids)
    with pytest.raises(ValueError, match="outside"):
        unlabeled_indices(2, [2])


# -- strong intensity augmentation -------------------------------------------------------------------------------------


def image_batch(b: int = 4, h: int = 12, w: int = 16, seed: int = 0) -> torch.Tensor:
    """Normalised images of integer 0-255 values skewed to the dark end (so equalize and autocontrast act)."""
    raw = (torch.rand(b, 3, h, w, generator=gen(seed)) ** 2 * 230).round() + 10
    return normalise(raw)


@pytest.mark.parametrize("op", list(INTENSITY_OPS))
def test_each_intensity_op_commutes_with_a_horizontal_flip(op):
    images = image_batch(h=24, w=32)  # equalize needs over 255 pixels (PIL's rule), else it keeps the image
    out = strong_intensity_augment(images, IMAGENET_MEAN, IMAGENET_STD, gen(5), num_ops=2, ops=(op,))
    flipped = strong_intensity_augment(images.flip(-1), IMAGENET_MEAN, IMAGENET_STD, gen(5), num_ops=2, ops=(op,))
    torch.testing.assert_close(flipped, out.flip(-1), rtol=1e-5, atol=1e-4)
    if op != "identity":
        assert not torch.allclose(out, images, atol=1e-3), f"{op} changed nothing"


def test_strong_augment_is_seeded_in_range_and_flip_equivariant():
    images = image_batch(b=8)
    images[0, :, :2] = 50.0  # far outside the image range: clamped
    out = strong_intensity_augment(images, IMAGENET_MEAN, IMAGENET_STD, gen(1))
    assert out.shape == images.shape and out.dtype == images.dtype
    raw = denormalise(out)
    assert raw.min() >= -1e-3 and raw.max() <= 255 + 1e-3
    assert torch.equal(out, strong_intensity_augment(images, IMAGENET_MEAN, IMAGENET_STD, gen(1)))
    assert not torch.allclose(out, strong_intensity_augment(images, IMAGENET_MEAN, IMAGENET_STD, gen(2)))
    flipped = strong_intensity_augment(images.flip(-1), IMAGENET_MEAN, IMAGENET_STD, gen(1))
    torch.testing.assert_close(flipped, out.flip(-1), rtol=1e-5, atol=1e-4)


def test_identity_round_trips_and_brightness_scales_every_pixel_alike():
    images = image_batch(b=3)
    same = strong_intensity_augment(images, IMAGENET_MEAN, IMAGENET_STD, gen(0), ops=("identity",))
    torch.testing.assert_close(same, images, rtol=1e-5, atol=1e-5)
    out = strong_intensity_augment(
        images, IMAGENET_MEAN, IMAGENET_STD, gen(0), num_ops=1, random_num_ops=False, ops=("brightness",)
    )
    ratio = denormalise(out) / denormalise(images).clamp_min(1.0)
    bright = denormalise(images) > 20  # away from 0, where rounding of the ratio is coarse
    for i in range(3):
        factor = ratio[i][bright[i]]
        assert 0.05 <= float(factor.mean()) <= 0.95  # AugSeg's brightness range
        torch.testing.assert_close(factor, torch.full_like(factor, float(factor.mean())), rtol=1e-4, atol=1e-4)


# -- adaptive CutMix -----------------------------------------------------------------------------------------------


def cutmix_inputs(b: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0):
    g = gen(seed)
    images_u = torch.randn(b, 3, h, w, generator=g)
    probs_u = torch.randn(b, c, h, w, generator=g).mul(3).softmax(1)
    images_l = torch.randn(b, 3, h, w, generator=g) + 10.0  # distinguishable from unlabeled pixels
    labels_l = torch.randint(0, c, (b, h, w), generator=g)
    labels_l[:, ::3, ::3] = IGNORE  # scattered: every pasted box of 3 x 3 or more holds some
    return images_u, probs_u, images_l, labels_l


def box_mask(box, h: int, w: int) -> torch.Tensor:
    y1, y2, x1, x2 = (int(v) for v in box)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def test_cutmix_box_replaces_exactly_the_box_in_image_and_target():
    images_u, probs_u, images_l, labels_l = cutmix_inputs()
    b, _, h, w = images_u.shape
    mixed = adaptive_cutmix(images_u, probs_u, images_l, labels_l, gen(0), confidence=torch.ones(b))
    assert not mixed.labeled_mixed.any()  # confidence 1: no labeled injection
    assert sorted(mixed.sources.tolist()) == list(range(b))
    areas = []
    for i in range(b):
        inside = box_mask(mixed.boxes[i], h, w)
        areas.append(int(inside.sum()))
        src = int(mixed.sources[i])
        torch.testing.assert_close(mixed.images[i], torch.where(inside, images_u[src], images_u[i]), rtol=0, atol=0)
        torch.testing.assert_close(mixed.probs[i], torch.where(inside, probs_u[src], probs_u[i]), rtol=0, atol=0)
    assert max(areas) > 0 and any(int(s) != i for i, s in enumerate(mixed.sources))
    assert mixed.valid.all() and not mixed.from_labeled.any()
    torch.testing.assert_close(mixed.confidence, mixed.probs.amax(1))


def test_cutmix_injects_labeled_boxes_with_one_hot_targets():
    images_u, probs_u, images_l, labels_l = cutmix_inputs(seed=1)
    b, c, h, w = probs_u.shape
    mixed = adaptive_cutmix(images_u, probs_u, images_l, labels_l, gen(3), confidence=torch.zeros(b))
    assert mixed.labeled_mixed.all()  # confidence 0: always injected
    onehot = torch.zeros(b, c, h, w)
    for k in range(c):
        onehot[:, k] = (labels_l == k).float()
    pool_img, pool_p, pool_valid, pool_lab = [], [], [], []
    for j in range(b):
        inside = box_mask(mixed.labeled_boxes[j], h, w)
        pool_img.append(torch.where(inside, images_l[j], images_u[j]))
        pool_p.append(torch.where(inside, onehot[j], probs_u[j]))
        pool_valid.append(~inside | (labels_l[j] != IGNORE))
        pool_lab.append(inside)
    for i in range(b):
        inside = box_mask(mixed.boxes[i], h, w)
        src = int(mixed.sources[i])
        assert torch.equal(mixed.images[i], torch.where(inside, pool_img[src], images_u[i]))
        assert torch.equal(mixed.probs[i], torch.where(inside, pool_p[src], probs_u[i]))
        assert torch.equal(mixed.valid[i], torch.where(inside, pool_valid[src], torch.ones(h, w, dtype=torch.bool)))
        assert torch.equal(mixed.from_labeled[i], inside & pool_lab[src])
    assert mixed.from_labeled.any() and not mixed.valid.all()  # ignored labels were pasted too
    # rows: a distribution where the target is known, all-zero where a pasted label was ignored
    sums = mixed.probs.sum(1)
    torch.testing.assert_close(sums[mixed.valid], torch.ones(int(mixed.valid.sum())))
    assert torch.equal(sums[~mixed.valid], torch.zeros(int((~mixed.valid).sum())))
    assert torch.equal(
        mixed.confidence[mixed.from_labeled & mixed.valid], torch.ones_like(sums[mixed.valid & mixed.from_labeled])
    )


def test_cutmix_injection_rate_follows_one_minus_confidence_and_is_seeded():
    images_u, probs_u, images_l, labels_l = cutmix_inputs(b=8, h=8, w=8)
    rate = np.mean(
        [
            adaptive_cutmix(images_u, probs_u, images_l, labels_l, gen(s), confidence=torch.full((8,), 0.3))
            .labeled_mixed.float()
            .mean()
            for s in range(150)
        ]
    )
    assert abs(rate - 0.7) < 0.05  # 1200 draws: standard error 0.013
    one = adaptive_cutmix(images_u, probs_u, images_l, labels_l, gen(9))
    two = adaptive_cutmix(images_u, probs_u, images_l, labels_l, gen(9))
    assert torch.equal(one.images, two.images) and torch.equal(one.probs, two.probs)
    assert torch.equal(one.boxes, two.boxes) and torch.equal(one.sources, two.sources)


def test_beta_draws_have_augseg_means():
    g = gen(0)
    draws_82 = [_beta(8, 2, g) for _ in range(3000)]
    draws_44 = [_beta(4, 4, g) for _ in range(3000)]
    assert abs(np.mean(draws_82) - 0.8) < 0.01 and abs(np.mean(draws_44) - 0.5) < 0.01
    assert abs(np.var(draws_44) - 1 / 36) < 0.003  # Beta(4, 4): ab / ((a+b)^2 (a+b+1)) = 16 / 576


def test_image_confidence_of_one_hot_uniform_and_a_fixed_distribution():
    c = 4
    onehot = F.one_hot(torch.tensor([[[2, 0]]]), c).permute(0, 3, 1, 2).float()
    uniform = torch.full((1, c, 1, 2), 1 / c)
    p = torch.tensor([0.7, 0.1, 0.1, 0.1])
    fixed = p[None, :, None, None].expand(1, c, 1, 3)
    entropy = -sum(float(q) * math.log(float(q)) for q in p)
    expected = (1 - entropy / math.log(c)) * 0.7
    got = image_confidence(torch.cat([onehot[:, :, :, :1], uniform[:, :, :, :1], fixed[:, :, :, :1]], 0))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, expected]))


# -- SSL loss ---------------------------------------------------------------------------------------------------------


def ce_hard(logits, labels):
    logp = logits.double().log_softmax(1)
    keep = labels != IGNORE
    picked = logp.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0]
    return -picked[keep].mean()


def ce_soft(logits, target, keep):
    logp = logits.double().log_softmax(1)
    return -(target.double() * logp).sum(1)[keep].mean()


def jml1(logits, target, keep, classes):
    """JML-1 in the Tversky form of REFERENCE.md, smoothing 1, dataset level, mean over ``classes``."""
    probs = logits.double().softmax(1)
    losses = []
    for c in classes:
        x, y = probs[:, c][keep], target[:, c].double()[keep]
        tp = ((x + y).sum() - (x - y).abs().sum()) / 2
        union = ((x + y).sum() + (x - y).abs().sum()) / 2  # tp + fp + fn
        losses.append(1 - (tp + 1) / (union + 1))
    return torch.stack(losses).mean()


def onehot_of(labels, c):
    keep = labels != IGNORE
    return F.one_hot(torch.where(keep, labels, 0), c).permute(0, 3, 1, 2).double() * keep[:, None]


def bls_dense(labels, c, eps, k=3):
    """Boundary label smoothing by loops: a kept pixel whose k x k window holds another kept class is smoothed."""
    target = onehot_of(labels, c)
    b, h, w = labels.shape
    r = k // 2
    for n in range(b):
        for i in range(h):
            for j in range(w):
                own = int(labels[n, i, j])
                if own == IGNORE:
                    continue
                window = labels[n, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
                if ((window != own) & (window != IGNORE)).any():
                    target[n, :, i, j] = (1 - eps) * target[n, :, i, j] + eps / c
    return target


def loss_inputs(seed: int = 0, b: int = 2, c: int = 4, h: int = 6, w: int = 6):
    g = gen(seed)
    logits_s = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    labels_s = torch.randint(0, c - 1, (b, h, w), generator=g)  # class c-1 absent: PRESENT != ALL
    labels_s[0, :2, :2] = IGNORE
    logits_u = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    teacher_logits = (torch.randn(b, c, h, w, generator=g) * 2).requires_grad_(True)
    valid_u = torch.rand(b, h, w, generator=g) > 0.2
    return logits_s, labels_s, logits_u, teacher_logits, valid_u


def test_each_term_matches_its_definition_with_soft_pseudo_labels():
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs()
    probs_u = teacher_logits.softmax(1)
    c = logits_s.shape[1]
    terms = SSLLoss()(logits_s, labels_s, logits_u, probs_u, valid_u)
    assert set(terms) == {"ce_s", "ce_u", "jml_s", "jml_u", "total"}  # the terms and their sum, as the criterion's
    total = terms["total"]
    present = sorted(set(labels_s[labels_s != IGNORE].tolist()))
    assert len(present) < c
    expected = {
        "ce_s": ce_hard(logits_s, labels_s),
        "ce_u": ce_soft(logits_u, probs_u, valid_u),
        "jml_s": jml1(logits_s, onehot_of(labels_s, c), labels_s != IGNORE, present),  # hard: PRESENT classes
        "jml_u": jml1(logits_u, probs_u, valid_u, range(c)),  # soft: ALL classes
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    eq64 = 0.25 * (0.5 * expected["ce_s"] + 0.5 * expected["ce_u"]) + 0.75 * (
        0.5 * expected["jml_s"] + 0.5 * expected["jml_u"]
    )
    torch.testing.assert_close(total.double(), eq64, rtol=1e-5, atol=1e-6)


def test_weights_combine_as_eq_64():
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs(seed=1)
    probs_u = teacher_logits.softmax(1)
    weights = dict(ce_weight=0.3, jml_weight=0.9, eta_s=0.2, eta_u=0.7, theta_s=0.4, theta_u=1.3)
    terms = SSLLoss(**weights)(logits_s, labels_s, logits_u, probs_u, valid_u)
    total = terms["total"]
    expected = 0.3 * (0.2 * terms["ce_s"] + 0.7 * terms["ce_u"]) + 0.9 * (0.4 * terms["jml_s"] + 1.3 * terms["jml_u"])
    torch.testing.assert_close(total, expected)
    only_ce = SSLLoss(jml_weight=0.0)(logits_s, labels_s, logits_u, probs_u, valid_u)
    assert set(only_ce) == {"ce_s", "ce_u", "total"}
    torch.testing.assert_close(only_ce["ce_u"], terms["ce_u"])
    no_u = SSLLoss(eta_u=0.0, theta_u=0.0)(logits_s, labels_s, logits_u, probs_u, valid_u)
    assert set(no_u) == {"ce_s", "jml_s", "total"}


def test_threshold_drops_exactly_the_low_confidence_pixels():
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs(seed=2)
    probs_u = teacher_logits.softmax(1)
    confidence = probs_u.detach().amax(1)
    threshold = float(confidence.median())
    kept = valid_u & (confidence >= threshold)
    assert 0 < int(kept.sum()) < int(valid_u.sum())
    loss = SSLLoss(confidence_threshold=threshold)
    assert torch.equal(loss.unlabeled_keep(probs_u, valid_u), kept)
    terms = loss(logits_s, labels_s, logits_u, probs_u, valid_u)
    total = terms["total"]
    torch.testing.assert_close(terms["ce_u"].double(), ce_soft(logits_u, probs_u, kept), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["jml_u"].double(), jml1(logits_u, probs_u, kept, range(4)), rtol=1e-5, atol=1e-6)
    total.backward()
    grad_norm = logits_u.grad.abs().sum(1)
    assert torch.equal(grad_norm > 0, kept)  # dropped pixels get no gradient, kept ones do
    assert teacher_logits.grad is None  # and the teacher none at all
    assert logits_s.grad is not None


def test_ce_u_mean_over_all_pixels_is_augseg_normalisation():
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs(seed=3)
    probs_u = teacher_logits.detach().softmax(1)
    terms = SSLLoss(confidence_threshold=0.5, ce_u_mean_over="all")(logits_s, labels_s, logits_u, probs_u, valid_u)
    kept = valid_u & (probs_u.amax(1) >= 0.5)
    per_pixel = -(probs_u.double() * logits_u.double().log_softmax(1)).sum(1)
    expected = (per_pixel * kept).sum() / kept.numel()
    torch.testing.assert_close(terms["ce_u"].double(), expected, rtol=1e-5, atol=1e-6)


def test_hard_pseudo_labels_are_the_thresholded_argmax():
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs(seed=4)
    probs_u = teacher_logits.softmax(1)
    c = probs_u.shape[1]
    kept = valid_u & (probs_u.detach().amax(1) >= 0.6)
    pseudo = torch.where(kept, probs_u.detach().argmax(1), IGNORE)
    terms = SSLLoss(pseudo_label="hard", confidence_threshold=0.6)(logits_s, labels_s, logits_u, probs_u, valid_u)
    present = sorted(set(pseudo[kept].tolist()))
    torch.testing.assert_close(terms["ce_u"].double(), ce_hard(logits_u, pseudo), rtol=1e-5, atol=1e-6)
    expected_jml = jml1(logits_u, onehot_of(pseudo, c), kept, present)
    torch.testing.assert_close(terms["jml_u"].double(), expected_jml, rtol=1e-5, atol=1e-6)


def test_bls_smooths_the_labels_and_the_hard_pseudo_labels():
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs(seed=5)
    probs_u = teacher_logits.detach().softmax(1)
    c = probs_u.shape[1]
    loss = SSLLoss(pseudo_label="hard", bls={"kernel_size": 3, "eps": 0.4})
    terms = loss(logits_s, labels_s, logits_u, probs_u, valid_u)
    target_s = bls_dense(labels_s, c, 0.4)
    keep_s = labels_s != IGNORE
    pseudo = torch.where(valid_u, probs_u.argmax(1), IGNORE)
    target_u = bls_dense(pseudo, c, 0.4)
    assert not torch.equal(target_s, onehot_of(labels_s, c))  # some pixels were smoothed
    expected = {
        "ce_s": ce_soft(logits_s, target_s, keep_s),
        "jml_s": jml1(logits_s, target_s, keep_s, range(c)),  # smoothed labels are soft: ALL classes
        "ce_u": ce_soft(logits_u, target_u, valid_u),
        "jml_u": jml1(logits_u, target_u, valid_u, range(c)),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    # soft pseudo-labels are left as the teacher gave them; only the labeled target is smoothed
    soft = SSLLoss(bls={"kernel_size": 3, "eps": 0.4})(logits_s, labels_s, logits_u, probs_u, valid_u)
    torch.testing.assert_close(soft["ce_u"].double(), ce_soft(logits_u, probs_u, valid_u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft["ce_s"], terms["ce_s"])


def test_bls_on_hard_pseudo_labels_smooths_the_whole_map_and_the_threshold_only_masks():
    """With a confidence threshold, boundaries are found on every pseudo-labelled pixel, not only the confident ones
    (a thresholded map would put ignored pixels along every low-confidence boundary and smooth nothing there)."""
    logits_s, labels_s, logits_u, teacher_logits, valid_u = loss_inputs(seed=5)
    probs_u = teacher_logits.detach().softmax(1)
    c = probs_u.shape[1]
    terms = SSLLoss(pseudo_label="hard", confidence_threshold=0.6, bls={"kernel_size": 3, "eps": 0.4})(
        logits_s, labels_s, logits_u, probs_u, valid_u
    )
    kept = valid_u & (probs_u.amax(1) >= 0.6)
    assert 0 < kept.sum() < valid_u.sum()
    target_u = bls_dense(torch.where(valid_u, probs_u.argmax(1), IGNORE), c, 0.4)
    torch.testing.assert_close(terms["ce_u"].double(), ce_soft(logits_u, target_u, kept), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["jml_u"].double(), jml1(logits_u, target_u, kept, range(c)), rtol=1e-5, atol=1e-6)


def test_ssl_loss_refuses_bad_settings_in_one_line():
    for kwargs, match in (
        ({"pseudo_label": "argmax"}, "pseudo_label"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"ce_weight": 0.0, "jml_weight": 0.0}, "weight 0"),
        ({"eta_u": -1.0}, "eta_u"),
        ({"bls": {"kernel": 3}}, "loss.bls.kernel"),
        ({"ce_u_mean_over": "pixels"}, "ce_u_mean_over"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            SSLLoss(**kwargs)
        assert "\n" not in str(err.value)


def test_no_pixel_kept_gives_zero_unlabeled_terms():
    logits_s, labels_s, logits_u, teacher_logits, _ = loss_inputs(seed=6)
    probs_u = teacher_logits.detach().softmax(1)
    nothing = torch.zeros(probs_u.shape[0], *probs_u.shape[2:], dtype=torch.bool)
    terms = SSLLoss()(logits_s, labels_s, logits_u, probs_u, nothing)
    total = terms["total"]
    assert terms["ce_u"].detach().item() == 0.0 and terms["jml_u"].detach().item() == 0.0 and torch.isfinite(total)


# -- one step of the pieces together --------------------------------------------------------------------------------


def test_one_ssl_step_with_every_piece():
    torch.manual_seed(0)
    student = TinyNet(classes=3)
    teacher = EMATeacher(student, decay=0.99, warmup=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    images_l, images_u = image_batch(b=2, seed=1), image_batch(b=2, seed=2)
    labels_l = torch.randint(0, 3, (2, 12, 16), generator=gen(3))
    g = gen(4)
    probs_u = teacher.predict(images_u).softmax(1)
    strong = strong_intensity_augment(images_u, IMAGENET_MEAN, IMAGENET_STD, g)
    mixed = adaptive_cutmix(strong, probs_u, images_l, labels_l, g)
    logits = student(torch.cat([images_l, mixed.images]))["out"]
    terms = SSLLoss(confidence_threshold=0.5)(logits[:2], labels_l, logits[2:], mixed.probs, mixed.valid)
    total = terms["total"]
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    before = teacher.model.head.weight.detach().clone()
    teacher.update(student)
    assert torch.isfinite(total) and set(terms) == {"ce_s", "ce_u", "jml_s", "jml_u", "total"}
    assert not torch.equal(before, teacher.model.head.weight)
    torch.testing.assert_close(teacher.model.head.weight, student.head.weight)  # warm-up: first decay is 0
