"""Sliding-window inference and test-time flipping."""

import pytest
import torch
from torch import nn

from segjml.engine import predict_probs, slide_logits


class PixelModel(nn.Module):
    """A per-pixel linear model (1x1 conv): its output at a pixel does not depend on the window."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class MirrorModel(nn.Module):
    """Flip-equivariant: a symmetric horizontal 1x3 kernel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False)
        with torch.no_grad():
            self.conv.weight[..., 2] = self.conv.weight[..., 0]

    def forward(self, x):
        return {"out": self.conv(x)}


@pytest.mark.parametrize("size", [(10, 12), (16, 16), (37, 53)])
def test_sliding_window_equals_whole_image_for_a_pixel_model(size):
    torch.manual_seed(0)
    model = PixelModel().eval()
    image = torch.randn(2, 3, *size)
    whole = model(image)["out"]
    slid = slide_logits(model, image, crop_size=(16, 16))
    assert slid.shape == whole.shape
    assert torch.allclose(slid, whole, atol=1e-5)


def test_windows_cover_every_pixel_and_overlaps_are_averaged():
    class Counter(nn.Module):  # returns a constant per call, so the average reveals how windows overlap
        calls = 0

        def forward(self, x):
            Counter.calls += 1
            return {"out": torch.full((x.shape[0], 1, *x.shape[-2:]), float(Counter.calls))}

    out = slide_logits(Counter(), torch.zeros(1, 3, 16, 40), crop_size=(16, 16))
    # stride 10 over width 40: windows at x = 0, 10, 20, 24
    assert Counter.calls == 4
    assert out[0, 0, 0, 5] == 1 and out[0, 0, 0, 15] == pytest.approx(1.5) and out[0, 0, 0, 39] == 4


def test_flip_tta_of_an_equivariant_model_changes_nothing():
    torch.manual_seed(1)
    model = MirrorModel().eval()
    image = torch.randn(1, 3, 9, 14)
    plain = predict_probs(model, image)
    flipped = predict_probs(model, image, flip=True)
    assert torch.allclose(plain, flipped, atol=1e-6)
    assert torch.allclose(
        predict_probs(model, image, mode="slide", crop_size=(8, 8), flip=True).sum(1), torch.ones(1, 9, 14), atol=1e-5
    )


def test_console_table_has_a_fine_grained_block():
    from segjml.engine.report import format_table
    from segjml.metrics import SegmentationMetrics

    g = torch.Generator().manual_seed(2)
    probs = torch.randn(3, 4, 8, 9, generator=g).softmax(1)
    target = torch.randint(0, 4, (3, 8, 9), generator=g)
    metrics = SegmentationMetrics(4, worst_q=20)
    metrics.update(probs, target)
    result = metrics.compute()
    lines = format_table(result, ["a", "b", "c", "d"]).splitlines()
    assert lines[lines.index("fine-grained (%)         mAcc     mIoU    mDice") + 4].split()[-3:] == [
        f"{result[k]:.2f}" for k in ("acc_i_q20", "iou_i_q20", "dice_i_q20")
    ]
    assert lines[-1] == f"per-image calibration (%): ece_i {result['ece_i']:.2f}  sce_i {result['sce_i']:.2f}"
    assert sum(line.startswith(("acc ", "miou ", "ece ")) for line in lines) == 3  # the main lines stay
    # a result of an older run (main metrics only): no fine-grained block
    old = {k: result[k] for k in ("acc", "miou", "miou_i", "miou_c", "ece", "bece", "sce", "bsce", "iou_per_class")}
    assert "fine-grained" not in format_table(old, ["a", "b", "c", "d"])
