"""Counting the aten ops a piece of code runs and the bytes they move: a CPU-side measure of what
memory-bound GPU work costs.

Outside the convolutions and matrix products most of a training step is memory-bound, so its GPU
time follows from how many bytes its kernels read and write and how many kernels it launches.
:class:`OpCounter` records every aten op that does work (views and bare allocations excluded)
with the bytes of its tensor inputs and outputs, for a forward and for ``torch.autograd.grad`` or
``backward`` alike. On the ``meta`` device the count runs at full size without computing anything.

Reads of a device value by the host (``.item()``, ``bool(t)``, ``int(t)``: ``_local_scalar_dense``)
are counted apart as ``syncs``: on CUDA each is a blocking wait for the stream.
"""

import collections
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops that allocate or describe memory without touching its contents (``_unsafe_view`` is a view
# that autograd does not track as one).
_NO_WORK = frozenset(
    {
        aten._unsafe_view.default,
        aten.empty.memory_format,
        aten.empty_like.default,
        aten.empty_strided.default,
        aten.new_empty.default,
        aten.new_empty_strided.default,
        aten.sym_size.int,
        aten.sym_stride.int,
        aten.sym_numel.default,
        aten.sym_storage_offset.default,
    }
)


def tensor_bytes(values) -> int:
    """Bytes of every tensor in the (nested) ``values``."""
    leaves, _ = tree_flatten(values)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


@dataclasses.dataclass
class OpCount:
    """What ran under one :class:`OpCounter`."""

    ops: int = 0
    bytes: int = 0
    syncs: int = 0
    by_op: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes_by_op: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def passes(self, reference_bytes: int) -> float:
        """Bytes moved as a multiple of ``reference_bytes`` (e.g. one full-size fp32 tensor)."""
        return self.bytes / reference_bytes

    def as_dict(self) -> dict:
        return {
            "ops": self.ops,
            "bytes": self.bytes,
            "syncs": self.syncs,
            "by_op": dict(self.by_op.most_common()),
        }


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as counter: ...``, then ``counter.count`` (an :class:`OpCount`).

    An op's bytes are those of its tensor inputs (an ``out=`` argument excluded) and of its
    outputs: an in-place op reads and writes its ``self``, an ``out=`` op only writes ``out``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.record(func, args, kwargs, result)
        return result

    def record(self, func, args, kwargs, result) -> None:
        """Count ``func`` as run on ``args`` and ``kwargs``, giving ``result`` (a subclass that
        runs extra ops inside ``__torch_dispatch__``, which no mode sees, records them here)."""
        if func is aten._local_scalar_dense.default:
            self.count.syncs += 1
        elif not func.is_view and func not in _NO_WORK:
            inputs = {k: v for k, v in kwargs.items() if k != "out"}
            moved = tensor_bytes((args, inputs)) + tensor_bytes(result)
            name = str(func.overloadpacket.__name__)
            self.count.ops += 1
            self.count.bytes += moved
            self.count.by_op[name] += 1
            self.count.bytes_by_op[name] += moved
