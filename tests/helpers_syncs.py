"""Count the device-to-host synchronisations code would make on a GPU, by running it on the CPU.

``count_syncs(fn)`` runs ``fn()`` and returns a ``collections.Counter`` of the operations that block the host until
the GPU has finished its queued work when their tensors are on a CUDA device: reading a value (``.item()``,
``float(t)``, ``if t:``), a copy to the host (``.cpu()``, ``.tolist()``) or an op whose output size depends on the
data (``nonzero``, boolean-mask indexing, ``unique`` ...). Every tensor is on the CPU here, so each counted op is one
that *would* sync on the GPU; run on CPU tensors, nothing is synchronised and nothing is slowed down.

Not seen from the CPU: host-to-device copies of host data (``torch.tensor(data, device="cuda")``, ``.to("cuda")``
without ``non_blocking``) also wait for the GPU, since PyTorch synchronises the stream after a pageable copy; keep them
out of loops. ``count_syncs`` is an upper bound in one respect: a ``.cpu()`` or ``.tolist()`` of a tensor that would
already be on the host in a GPU run is counted too.

Usage (a training step, a metric update)::

    counts = count_syncs(lambda: metric.update(probs, target))
    assert sum(counts.values()) == 0, counts
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _arg(func, args: tuple, kwargs: dict, name: str, default=None):
    """Argument ``name`` of an aten op call, positional or keyword."""
    for i, schema_arg in enumerate(func._schema.arguments):
        if schema_arg.name == name:
            return args[i] if i < len(args) else kwargs.get(name, default)
    return default


def _bool_indices(func, args: tuple, kwargs: dict) -> int:
    """Bool / uint8 index tensors of an indexing op: each becomes a ``nonzero`` inside the kernel."""
    indices = _arg(func, args, kwargs, "indices", ())
    return sum(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _once(func, args: tuple, kwargs: dict) -> int:
    return 1


def _twice(func, args: tuple, kwargs: dict) -> int:
    return 2


# aten op -> how many times it reads from the device on CUDA (0: not in this call). Each entry was checked against
# PyTorch's CUDA sources (aten/src/ATen/native/cuda).
SYNC_OPS = {
    # .item(), float(t), int(t), bool(t), `if t:`, `while t:`; is_nonzero is what bool(t) reaches in some versions
    aten._local_scalar_dense: _once,
    aten.is_nonzero: _once,
    # output size depends on the data: the kernel reads the count back before it allocates the result
    aten.nonzero: _once,  # also torch.where(cond), argwhere, nonzero(as_tuple=True)
    aten.masked_select: _once,
    aten._unique: _once,
    aten._unique2: _once,
    aten.unique_dim: _once,
    aten.unique_consecutive: _once,
    aten.unique_dim_consecutive: _once,
    aten.repeat_interleave: lambda func, args, kwargs: int(_arg(func, args, kwargs, "output_size") is None),
    # x[mask] and x[mask] = v (but x[mask] = 0.0 is a masked_fill_: see _CountOps)
    aten.index: _bool_indices,
    aten.index_put: _bool_indices,
    aten.index_put_: _bool_indices,
    aten._index_put_impl_: _bool_indices,
    # bincount reads min (bounds check) and max (output size) back, whatever `minlength` says
    aten.bincount: _twice,
    # histc reads min and max back when the range is not given (min == max, the default)
    aten.histc: lambda func, args, kwargs: 2 * (_arg(func, args, kwargs, "min") == _arg(func, args, kwargs, "max")),
    # a Python bool out of tensors
    aten.equal: _once,
    aten.allclose: _once,
}
# Not syncs, so not counted: aten._assert_async (on CUDA a failed check is a device-side assert raised later: PyTorch
# itself uses it to bound-check indices without a sync), nonzero_static (fixed output size), scatter_add_, index_add_,
# index_put_ with integer indices, sort / topk / cumsum / amax and every other op whose output shape is known.

_PUTS = {aten.index_put, aten.index_put_, aten._index_put_impl_}

_HOST_COPIES = {"cpu", "tolist"}
"""Tensor methods that copy to the host (``numpy()`` needs a host tensor, so a GPU run calls one of these first)."""


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to(...)`` call targets the CPU (``.to("cpu")``, ``.to(device=torch.device("cpu"))``)."""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


class _CountOps(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts
        self.python_scalars: dict[int, weakref.ref] = {}  # 0-dim tensors made from Python numbers (lift_fresh)

    def _python_scalar(self, value) -> bool:
        ref = self.python_scalars.get(id(value))
        return ref is not None and ref() is value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten.lift_fresh and out.dim() == 0:
            self.python_scalars[id(out)] = weakref.ref(out)
        reads = SYNC_OPS.get(packet)
        n = reads(func, args, kwargs) if reads is not None else 0
        if packet in _PUTS and not _arg(func, args, kwargs, "accumulate") and self._python_scalar(args[2]):
            n = 0  # x[mask] = 0.0: PyTorch fills with masked_fill_ when the value is a host scalar, no sync
        if n:
            self.counts[str(packet)] += n
        return out


class _CountHostCopies(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_COPIES or (name == "to" and _to_host(args, kwargs)):
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **kwargs)


def count_syncs(fn: Callable[[], object]) -> Counter:
    """Run ``fn()`` and return how often it would make the host wait for the GPU, per op (e.g.
    ``{"aten._local_scalar_dense": 2, "aten.bincount": 2, "Tensor.tolist": 1}``: one ``bincount`` reads twice);
    empty when it never would."""
    counts: Counter = Counter()
    with _CountHostCopies(counts), _CountOps(counts):
        fn()
    return counts
