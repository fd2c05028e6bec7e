"""Counted cost of the pretraining step's parts: aten ops, bytes moved, host syncs.

Memory-bound GPU work costs what its kernels move through HBM plus a launch each, so these
counts (:class:`op_count.OpCounter`) predict it on a CPU. They run on the
``meta`` device at full size without computing anything. ``benchmarks/step_cost.py`` prints them
with predicted milliseconds; the tests hold the lean parts to their budgets.

The whole step is counted as it runs on a GPU under ``--amp`` (:class:`GpuStepCounter`): the
meta device has no autocast, and its convolution returns NCHW whatever its input where cuDNN
keeps channels_last, so the counter casts and lays out as those would.
"""

import dataclasses
import logging
from collections.abc import Callable

import torch
from op_count import OpCount, OpCounter
from torch import nn
from torch.utils._pytree import tree_map

from moco_d2.pretrain.device_augment import DeviceAugment, TwoCropsLoader
from moco_d2.pretrain.device_decode import DeviceDecoder

aten = torch.ops.aten

BN_SHAPE = (64, 256, 28, 28)  # a res3 activation at batch 64 and 224 px
AUGMENT_SHAPE = (256, 3, 224, 224)  # one view of a 256-image batch
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def is_channels_last(x: torch.Tensor) -> bool:
    channels_last = torch.channels_last
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last)


class GpuStepCounter(OpCounter):
    """:class:`OpCounter` of meta tensors as a CUDA step under bf16 autocast runs them.

    Convolutions and matrix products take bf16 inputs, fp32 ones cast first, and the casts are
    counted as autocast's are; everything else keeps its dtype, as autocast leaves it (BatchNorm
    takes the bf16 activations with its fp32 parameters). A convolution of a channels_last input
    returns channels_last, as cuDNN does. Autocast casts a weight once per forward and keeps the
    cast for the backward; here the backward casts it again (a few hundred MB of a ResNet-50 step
    of hundreds of GB).
    """

    LOWER_PRECISION = frozenset(
        {
            aten.convolution.default,
            aten.convolution_backward.default,
            aten.addmm.default,
            aten.mm.default,
            aten.bmm.default,
        }
    )
    _CONVOLUTIONS = (aten.convolution.default, aten.convolution_backward.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOWER_PRECISION:
            args, kwargs = tree_map(self._to_bf16, (args, kwargs))
        result = func(*args, **kwargs)
        if func in self._CONVOLUTIONS and is_channels_last(args[0]):
            result = tree_map(_channels_last, result)
        self.record(func, args, kwargs, result)
        return result

    def _to_bf16(self, t):
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32):
            return t
        cast = t.to(torch.bfloat16)
        self.record(aten._to_copy.default, (t,), {"dtype": torch.bfloat16}, cast)
        return cast


def _channels_last(t):
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_meta:
        return torch.empty_like(t, memory_format=torch.channels_last)
    return t


def bn_layer_cost(
    module: nn.Module,
    memory_format: torch.memory_format,
    shape: tuple[int, ...] = BN_SHAPE,
    dtype: torch.dtype = torch.bfloat16,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> OpCount:
    """Forward + backward of one BatchNorm layer in training mode on the meta device, with
    ``dtype`` activations and fp32 parameters (bf16: what a convolution under autocast hands
    it); ``forward(module, x)`` defaults to ``module(x)``. The incoming gradient is made outside
    the count."""
    forward = forward or (lambda m, t: m(t))
    module = module.to("meta").train()
    x = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    with torch.no_grad():
        grad = torch.empty_like(forward(module, x))
    with OpCounter() as counter:
        torch.autograd.grad(forward(module, x), [x, *module.parameters()], grad)
    return counter.count


def augment_cost(aug_plus: bool = True, shape: tuple[int, ...] = AUGMENT_SHAPE) -> OpCount:
    """One view of uint8 crops through :class:`DeviceAugment`, on the meta device."""
    crops = torch.empty(shape, dtype=torch.uint8, device="meta")
    with OpCounter() as counter:
        DeviceAugment(aug_plus)(crops)
    return counter.count


def decode_crop_cost(
    batch: int = 256, crop_size: int = 224, width: int = 500, height: int = 375
) -> OpCount:
    """The crops that ``--decode-on device`` cuts from ``batch`` decoded ``width`` x ``height``
    images on a GPU (two RandomResizedCrop views each, resized as :class:`DeviceDecoder` resizes
    them off the CPU), on the meta device; ``torchvision`` rounds each view itself."""
    torch.manual_seed(0)
    draw = TwoCropsLoader(crop_size).draw_boxes
    pixels = torch.empty(3, height, width, dtype=torch.uint8, device="meta")
    boxes = [draw(width, height) for _ in range(batch)]
    decoder = DeviceDecoder(crop_size, folder=None)
    with OpCounter() as counter:
        decoder.views([pixels] * batch, boxes, None, pixels.device)
    return counter.count


def fp32_passes(count: OpCount, shape: tuple[int, ...]) -> float:
    """Bytes moved as full-size fp32 tensors of ``shape``."""
    return count.passes(4 * torch.Size(shape).numel())


@dataclasses.dataclass(frozen=True)
class CompiledCount:
    """What inductor generated for a compiled forward + backward: its kernels and its own count
    of the bytes they read and write."""

    kernels: int
    bytes: int


def compiled_bn_layer_cost(
    module: nn.Module,
    memory_format: torch.memory_format,
    shape: tuple[int, ...] = BN_SHAPE,
    dtype: torch.dtype = torch.bfloat16,
) -> CompiledCount:
    """:func:`bn_layer_cost` for ``torch.compile(module)``, from inductor's metrics. Inductor
    compiles for the CPU here (it needs a C++ compiler), so the kernels are its CPU kernels; the
    fusion decisions that set the bytes are the same for its GPU backend."""
    from torch._inductor import config, metrics

    # inductor counts bytes only while its metrics log is on; keep that log quiet
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(quiet := logging.NullHandler())
    module = module.train()
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    try:
        with config.patch(fx_graph_cache=False):  # a cached graph is not counted again
            torch._dynamo.reset()
            metrics.reset()
            y = torch.compile(module)(x)
            torch.autograd.grad(y, [x, *module.parameters()], torch.ones_like(y))
            return CompiledCount(metrics.generated_kernel_count, metrics.num_bytes_accessed)
    finally:
        torch._dynamo.reset()
        log.removeHandler(quiet)
        log.setLevel(level)
        log.propagate = propagate


@dataclasses.dataclass(frozen=True)
class StepCount:
    """A counted training step: all its ops, the FLOPs of its convolutions and matrix products,
    and the ops and bytes of those compute-bound ops alone."""

    count: OpCount
    flops: int
    compute_ops: int
    compute_bytes: int


def fast_step_cost(
    data_dir: str,
    bn_splits: int,
    arch: str = "resnet50",
    batch: int = 256,
    crop_size: int = 224,
    moco_k: int = 65536,
    channels_last: bool = True,
    augmented: bool = True,
) -> StepCount:
    """The fast step of ``tools/pretrain_moco.py`` with its CUDA defaults and ``--amp``, built by
    the tool's own setup from its parser, at full size on the meta device: both views augmented
    from uint8 crops (their nvJPEG decode and crop are not counted), the MoCo forward and
    backward, SGD, the momentum update and the queue; ``augmented`` False starts from the two
    normalised views instead. The second step is counted (the first makes SGD's momentum
    buffers). ``data_dir`` is any readable image folder: the setup checks
    one, and nothing is read from it."""
    from torch.utils.flop_counter import FlopCounterMode

    from moco_d2.launch import Launch
    from moco_d2.pretrain.config import PretrainConfig
    from moco_d2.pretrain.main import build_model, build_optimizer, build_train_data, train_step

    argv = [data_dir, "-a", arch, "-b", str(batch), "--crop-size", str(crop_size)]
    argv += ["--moco-k", str(moco_k), "--bn-splits", str(bn_splits), "--decode-on", "loader"]
    argv += ["--augment-on", "device", "--channels-last" if channels_last else "--no-channels-last"]
    cuda = Launch(1, 0, 1, torch.device("cuda"))  # its defaults; nothing runs on it
    config = PretrainConfig.parse(argv).resolved(cuda, seed=0)
    data = build_train_data(config, data_dir)
    meta = torch.device("meta")
    torch.manual_seed(0)
    model = build_model(config, meta)
    optimizer = build_optimizer(model, config, meta)
    images: torch.Tensor | list[torch.Tensor]
    if augmented:
        images = torch.empty(batch, 2, 3, crop_size, crop_size, dtype=torch.uint8, device=meta)
    else:
        images = [torch.empty(batch, 3, crop_size, crop_size, device=meta) for _ in range(2)]
    if not augmented:
        data = dataclasses.replace(data, augment=None)

    def step():
        train_step(model, images, optimizer, data, config, meta)

    with GpuStepCounter():
        step()
    with FlopCounterMode(display=False) as flops, GpuStepCounter() as counter:
        step()
    count = counter.count
    compute = [op.overloadpacket.__name__ for op in GpuStepCounter.LOWER_PRECISION]
    return StepCount(
        count,
        flops.get_total_flops(),
        sum(count.by_op[name] for name in compute),
        sum(count.bytes_by_op[name] for name in compute),
    )
