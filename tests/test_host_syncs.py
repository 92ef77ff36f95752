"""Host-sync budget: ``SegmentationMetrics.update`` reads from the device a fixed number of times per batch, not per
image (issue 22). Counted on the CPU with ``tests/helpers_syncs.count_syncs``: the ops that would make the host wait
for a GPU."""

from collections import Counter

import pytest
import torch

from segjml.metrics import SegmentationMetrics
from tests.helpers_syncs import count_syncs
from tests.test_metrics import random_batch

UPDATE_SYNCS = 1
"""Host reads of one ``update``: its input checks (they raise in ``update``) and the number of confident (pixel,
class) pairs, read back together. Before issue 22: 19 for one image plus 5 per further image (54 for 8 images)."""


def test_count_syncs_sees_host_reads_and_nothing_else():
    x, ids = torch.rand(6), torch.tensor([0, 2, 2])
    mask = x > 0.5

    def reads():
        x.sum().item()
        if mask.any():
            pass
        x[mask]
        x.clone()[mask] = x[:1]  # a tensor value: index_put_ with a mask
        x.tolist()
        x.cpu()
        torch.unique(ids)
        torch.bincount(ids, minlength=4)
        torch.where(mask)
        torch.repeat_interleave(ids)

    assert count_syncs(reads) == Counter(
        {
            "aten._local_scalar_dense": 2,
            "aten.index": 1,
            "aten.index_put_": 1,
            "Tensor.tolist": 1,
            "Tensor.cpu": 1,
            "aten._unique2": 1,
            "aten.bincount": 2,
            "aten.nonzero": 1,
            "aten.repeat_interleave": 1,
        }
    )

    def no_reads():
        x.clone()[mask] = 0.0  # a scalar value: masked_fill_
        torch.zeros(3).index_add_(0, ids, x[:3])
        torch.zeros(3).scatter_add_(0, ids, x[:3])
        torch.nonzero_static(mask, size=6)
        torch.where(mask, x, 0.0)
        torch.repeat_interleave(ids, output_size=4)
        x.to(torch.float64)

    assert count_syncs(no_reads) == Counter()


@pytest.mark.parametrize("c", [5, 23])  # C <= n_bins, and C > n_bins (pixels with every p_k < 1 / n_bins)
def test_update_syncs_do_not_grow_with_the_batch(c):
    counts = {}
    for b in (1, 8):
        probs, target = random_batch(40 + b, b=b, h=12, w=10, c=c)
        if c > 10:
            probs[:, :, :2] = (torch.randn(b, c, 2, 10, generator=torch.Generator().manual_seed(1)) * 0.05).softmax(1)
        target[-1] = 255  # an image without a counted pixel
        metric = SegmentationMetrics(c)
        counts[b] = count_syncs(lambda m=metric, p=probs, t=target: m.update(p, t))
    assert counts[1] == counts[8], counts
    assert sum(counts[1].values()) <= UPDATE_SYNCS, counts[1]


STEP_SYNCS = {"ce": 3, "ce_jml": 7, "ce_jml_bls": 13}
"""Host reads of one fp32 training step (no logging, no evaluation), per loss preset: the finiteness check of the
loss (1, also the all-reduce of that flag under DDP), the label check of each criterion term (the main and the
auxiliary head: 2) and, for the Jaccard terms' fused nodes, the per-image counts of ignored and smoothed pixels read
back to size their blocks (one read each, whatever the batch). The issue's aim of one per step is not met by the
losses' input checks; this budget stops it from growing."""


@pytest.mark.parametrize(
    "loss", [n if n == "ce_jml_bls" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(STEP_SYNCS)]
)
def test_training_step_syncs_do_not_grow_with_the_batch(loss, tmp_path):
    from segjml.engine import trainer as T
    from tests.helpers import compose_config

    counts = []
    for batch in (2, 4):
        cfg = compose_config(["debug=fast", f"loss={loss}", f"trainer.batch_size={batch}"], tmp_path)
        run = T.build_run(cfg)
        state, data = T.TrainState(), T.batches(run.train_loader, 0)
        T.train_step(run, state, [run.to_device(*next(data))])  # first step: lazy initialisations
        micro = [run.to_device(*next(data))]
        counts.append(
            sum(count_syncs(lambda run=run, state=state, micro=micro: T.train_step(run, state, micro)).values())
        )
    assert counts == [STEP_SYNCS[loss]] * 2
