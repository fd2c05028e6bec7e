"""SplitBatchNorm: one process imitating the per-GPU BatchNorm of multi-GPU training.

In training mode the batch is cut into ``num_splits`` groups and each group is normalised with
its own statistics, like the per-GPU slices of a distributed batch. Which samples form a group
depends on the memory format, because each format has one grouping the native BatchNorm kernel
can run on without copying the activations:

- contiguous NCHW: interleaved, sample ``n`` in group ``n % num_splits``, as in the MoCo authors'
  single-GPU SplitBatchNorm (and lightly's). ``x.view(n // s, s * c, h, w)`` is a free view in
  which channel ``j * c + k`` of row ``i`` is sample ``i * s + j``, so one native (cuDNN or CPU)
  call normalises all groups at once;
- channels_last: contiguous chunks, samples ``[j * n // s, (j + 1) * n // s)`` in group ``j``, as
  timm's and Composer's ghost BatchNorm. No view of NHWC memory puts a group index next to the
  channels, but each chunk of the batch is itself a contiguous NHWC tensor: the native kernel runs
  once per chunk and writes into a slice of one output, and its backward once per chunk, joined
  by one ``cat`` (the kernel has no real ``out=`` backward: its ``.out`` form copies too).

Any fixed rule gives the same mixing: queries come in random order from the sampler, and the keys
are permuted (``shuffle.batch_shuffle_local``) before the key encoder, so a query and its positive
key land in independent random groups whichever rule maps batch positions to groups, and BN
cannot pair them through shared batch statistics. Running statistics are the mean over groups of
what BatchNorm2d would store; evaluation is ordinary BatchNorm, and the state_dict is exactly
BatchNorm2d's, so checkpoints stay interchangeable between formats and with ``--bn-splits 1``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moco_d2.errors import UserError

_aten = torch.ops.aten


def _stats_dtype(x: torch.Tensor, param: torch.Tensor | None) -> torch.dtype:
    """The dtype native_batch_norm keeps its statistics in, which its ``out=`` form requires.

    CUDA: fp32 for a bf16/fp16 input. CPU: fp32 only when the parameters are of a wider type than
    the input (bf16 activations with fp32 weights, as under autocast), else the input's dtype.
    """
    if x.device.type == "cpu":
        return x.dtype if param is None or param.dtype == x.dtype else torch.float32
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


class _ChunkedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of each of ``s`` contiguous batch chunks with its own statistics.

    The running statistics are not updated in place: each chunk updates its own copy, and the
    ``(s, c)`` copies are returned.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, s, momentum, eps):
        c = x.shape[1]
        out = torch.empty_like(x)  # same strides as x, so each chunk is a contiguous slice
        param = next((t for t in (weight, bias, running_mean) if t is not None), None)
        dtype = _stats_dtype(x, param)
        mean, invstd = x.new_empty((s, c), dtype=dtype), x.new_empty((s, c), dtype=dtype)
        track = running_mean is not None
        group_mean = running_mean.repeat(s).view(s, c) if track else None
        group_var = running_var.repeat(s).view(s, c) if track else None
        for g, (x_g, out_g) in enumerate(zip(x.chunk(s), out.chunk(s))):
            _aten.native_batch_norm.out(
                x_g, weight, bias,
                group_mean[g] if track else None, group_var[g] if track else None,
                True, momentum, eps, out=out_g, save_mean=mean[g], save_invstd=invstd[g],
            )  # fmt: skip
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.s, ctx.eps = s, eps
        if track:
            ctx.mark_non_differentiable(group_mean, group_var)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the running stats
        return out, group_mean, group_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        s, mask = ctx.s, list(ctx.needs_input_grad[:3])
        parts = [
            _aten.native_batch_norm_backward(
                g_g, x_g, weight, None, None, mean[g], invstd[g], True, ctx.eps, mask
            )
            for g, (g_g, x_g) in enumerate(zip(grad_out.chunk(s), x.chunk(s)))
        ]
        grad_x = torch.cat([p[0] for p in parts]) if mask[0] else None
        grad_w = grad_b = None
        if mask[1] or mask[2]:  # affine: weight and bias both need grad or neither
            sums = torch.stack([p[1] for p in parts] + [p[2] for p in parts]).view(2, s, -1).sum(1)
            grad_w, grad_b = sums[0], sums[1]
        return grad_x, grad_w, grad_b, None, None, None, None, None


def chunked_batch_norm(x, weight, bias, running_mean, running_var, num_splits, momentum, eps):
    """Normalise each contiguous batch chunk of the channels_last ``x`` on its own.

    Returns the output (``x``'s shape, dtype and format) and, when ``running_mean`` is given, each
    chunk's update of the running statistics as ``(num_splits, c)`` tensors (else None).

    Under torch.compile it is written with plain differentiable ops on the free
    ``(num_splits, n // num_splits * h * w, c)`` view of the NHWC memory instead, which inductor
    fuses into one statistics pass and one normalising pass each way (the Function's ``out=``
    writes into slices and its per-chunk running statistics do not trace through AOTAutograd).
    """
    if not torch.compiler.is_compiling():
        return _ChunkedBatchNorm.apply(
            x, weight, bias, running_mean, running_var, num_splits, momentum, eps
        )
    n, c, h, w = x.shape
    groups = x.permute(0, 2, 3, 1).reshape(num_splits, -1, c)
    var, mean = torch.var_mean(groups.float(), dim=1, correction=0)  # (s, c) each
    scale = torch.rsqrt(var + eps) if weight is None else torch.rsqrt(var + eps) * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    out = torch.addcmul(shift.unsqueeze(1), groups, scale.unsqueeze(1)).to(x.dtype)
    group_mean = group_var = None
    if running_mean is not None:
        count = groups.shape[1]
        group_mean = running_mean.lerp(mean.detach(), momentum)
        group_var = running_var.lerp(var.detach() * (count / (count - 1)), momentum)
    return out.view(n, h, w, c).permute(0, 3, 1, 2), group_mean, group_var


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by num_splits {s}")
        if n // s * h * w == 1:
            raise ValueError(
                f"SplitBatchNorm: groups of {n // s} sample of {h}x{w} have one value per channel"
            )
        momentum = self._momentum()
        track = self.track_running_stats
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out, group_mean, group_var = chunked_batch_norm(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                s,
                momentum,
                self.eps,
            )
        else:
            # group j of the interleaved batch = channels [j*c, (j+1)*c) of this free view. The
            # result is reshaped with _unsafe_view, which autograd does not track as a view:
            # the in-place ReLU that follows in a ResNet would otherwise make its backward copy
            # the whole activation (CopySlices)
            group_mean = group_var = None
            if track:
                running_mean, running_var = self._running_stats()
                group_mean, group_var = running_mean.repeat(s), running_var.repeat(s)
            out = F.batch_norm(
                x.contiguous().view(n // s, s * c, h, w),
                group_mean,
                group_var,
                self.weight.repeat(s) if self.affine else None,
                self.bias.repeat(s) if self.affine else None,
                True,
                momentum,
                self.eps,
            )
            out = torch.ops.aten._unsafe_view(out, (n, c, h, w))
        if track:
            running_mean, running_var = self._running_stats()
            with torch.no_grad():
                running_mean.copy_(group_mean.view(s, c).mean(dim=0))
                running_var.copy_(group_var.view(s, c).mean(dim=0))
        return out

    def _running_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance buffers, which exist when the layer tracks them."""
        assert self.running_mean is not None and self.running_var is not None
        return self.running_mean, self.running_var

    def _momentum(self) -> float:
        """Count this batch and return the momentum nn.BatchNorm2d would use for it."""
        if not self.track_running_stats:
            return 0.0
        # BatchNorm2d registers the counter with the running statistics
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Return ``module`` with every BatchNorm2d replaced by a SplitBatchNorm holding its state."""
    if num_splits == 1:
        return module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        ref = module.weight if module.affine else module.running_mean
        split = SplitBatchNorm(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        split.load_state_dict(module.state_dict())
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits))
    return module


# A BN channel normalised over m values keeps only m-1 degrees of freedom (m=2: just a sign).
# With 2 images per group and a 1x1 last stage, a ResNet-50 ended one epoch with a stem conv std
# of 1.6e7 (0.025 at init) and BN running_var up to 3.7e27, its L2-normalised loss looking normal.
MIN_BN_VALUES = 16
MAX_DEFAULT_SPLITS = 8


def last_stage_positions(arch: str, crop_size: int) -> int:
    """Fewest spatial positions any BatchNorm of torchvision's ``arch`` sees at ``crop_size`` (the
    last stage, res5 in a ResNet), from shapes only: the model is built on the meta device."""
    import torchvision

    sizes: list[int] = []
    with torch.device("meta"):
        encoder = torchvision.models.get_model(arch, num_classes=1).eval()
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-2] * out.shape[-1]))
            for m in encoder.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        encoder(torch.empty(1, 3, crop_size, crop_size))
    for hook in hooks:
        hook.remove()
    return min(sizes) if sizes else MIN_BN_VALUES


def resolve_bn_splits(config, batch: int, distributed: bool) -> int:
    """``--bn-splits``, or its default: 1 when distributed, else the largest s <= 8 that splits
    ``batch`` into groups of at least 2 images and ``MIN_BN_VALUES`` values per channel in the
    last stage. Smaller groups are refused (UserError)."""
    positions = last_stage_positions(config.arch, config.crop_size)
    if config.bn_splits is not None:
        if batch % config.bn_splits:
            raise UserError(
                f"--bn-splits {config.bn_splits} does not divide the per-process batch {batch}"
            )
        splits = config.bn_splits
    elif distributed:
        splits = 1
    else:
        splits = max(
            s
            for s in range(1, MAX_DEFAULT_SPLITS + 1)
            if batch % s == 0
            and (s == 1 or (batch // s >= 2 and batch // s * positions >= MIN_BN_VALUES))
        )
    values = batch // splits * positions
    if values < MIN_BN_VALUES:
        fewer = f", or fewer --bn-splits (now {splits})" if splits > 1 else ""
        raise UserError(
            f"BatchNorm groups too small: {batch // splits} images per group x {positions} "
            f"last-stage positions at --crop-size {config.crop_size} = {values} values per "
            f"channel (need >= {MIN_BN_VALUES}); use a larger --crop-size or a larger -b{fewer}"
        )
    return splits
