"""SplitBatchNorm: one process imitating the per-GPU BatchNorm of multi-GPU training.

In training mode the batch is cut into ``num_splits`` groups and each group is normalised with
its own statistics, like the per-GPU slices of a distributed batch. Grouping is interleaved:
sample ``n`` is in group ``n % num_splits``, as in the MoCo authors' single-GPU SplitBatchNorm
(and lightly's). It is the same in NCHW and channels_last, so converting a model's memory format
does not change which samples share statistics.

Interleaving rather than contiguous chunks costs nothing in mixing: queries come in random order
from the sampler, and the keys are permuted (``shuffle.batch_shuffle_local``) before the key
encoder, so a query and its positive key land in independent random groups whichever fixed
rule maps positions to groups. BN therefore cannot pair them through shared batch statistics.

Why interleaved: for a contiguous NCHW tensor ``x.view(n // s, s * c, h, w)`` is a free view in
which channel ``j * c + k`` of row ``i`` is sample ``i * s + j``, so the native (cuDNN or CPU)
BatchNorm kernel normalises all groups at once without copying. A channels_last tensor is NHWC
in memory; its free view ``(n // s, s, h * w, c)`` goes to a small autograd Function with the
per-group statistics and a hand-written backward, again without a layout copy. Running
statistics are the mean over groups of what BatchNorm2d would store; evaluation is ordinary
BatchNorm, and the state_dict is exactly BatchNorm2d's, so checkpoints stay interchangeable.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _group_sum(t: torch.Tensor, inner_dim: int) -> torch.Tensor:
    # two steps: CPU reduces one middle dim several times faster than dims (0, inner) at once
    return t.sum(inner_dim, keepdim=True).sum(0, keepdim=True)


class _GroupedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of a ``(n // s, s, A, B)`` view, per (group, channel).

    The channel is dim ``channel_dim`` (2 or 3); statistics reduce over dim 0 and the other
    trailing dim, in two passes (mean, then centred squares) as the native CPU kernel does.
    Arithmetic is fp32 (fp64 for fp64 input) whatever the input dtype, and the output has the
    input's dtype, as ``nn.BatchNorm2d`` gives under autocast. For fp32 input each pass writes
    into the one full-size buffer that becomes the result (a fresh large tensor costs page
    faults on CPU); a bf16 input adds one fp32 upcast per pass.
    """

    @staticmethod
    def forward(ctx, xv, weight, bias, eps, channel_dim):
        inner = 5 - channel_dim
        x = xv.to(torch.promote_types(xv.dtype, torch.float32))  # one upcast, not one per op
        count = x.numel() // (x.shape[1] * x.shape[channel_dim])
        mean = _group_sum(x, inner) / count
        buf = torch.sub(x, mean).square_()
        var = _group_sum(buf, inner) / count
        invstd = torch.rsqrt(var + eps)
        shape = [1, 1, 1, 1]
        shape[channel_dim] = -1
        scale = invstd if weight is None else invstd * weight.view(shape)
        shift = -mean * scale if bias is None else bias.view(shape) - mean * scale
        out = torch.addcmul(shift, x, scale, out=buf).to(xv.dtype)
        ctx.save_for_backward(xv, mean, invstd, weight)
        ctx.channel_dim = channel_dim
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean.flatten(), var.flatten()

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        xv, mean, invstd, weight = ctx.saved_tensors
        inner = 5 - ctx.channel_dim
        x, g = xv.to(mean.dtype), grad_out.to(mean.dtype)
        count = x.numel() // mean.numel()
        sum_g = _group_sum(g, inner)
        buf = torch.sub(x, mean).mul_(g)
        sum_g_xhat = _group_sum(buf, inner) * invstd
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            shape = [1, 1, 1, 1]
            shape[ctx.channel_dim] = -1
            a = invstd if weight is None else invstd * weight.view(shape)
            b = a * invstd * sum_g_xhat / -count
            const = -(a * sum_g / count + b * mean)
            grad_x = torch.addcmul(const, b, x, out=buf).addcmul_(a, g).to(xv.dtype)
        groups = mean.shape[1]
        if ctx.needs_input_grad[1]:
            grad_w = sum_g_xhat.view(groups, -1).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_g.view(groups, -1).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def grouped_batch_norm(xv, weight, bias, eps, channel_dim):
    """Normalise each (group, channel) of the ``(n // s, s, A, B)`` view ``xv`` on its own.

    Returns the output (same shape and dtype as ``xv``), the per-group mean and biased variance
    (fp32, shape ``(s, c)``, for the running statistics).
    """
    return _GroupedBatchNorm.apply(xv, weight, bias, eps, channel_dim)


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
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out, mean, var = grouped_batch_norm(
                x.permute(0, 2, 3, 1).view(n // s, s, h * w, c), self.weight, self.bias, self.eps, 3
            )
            if self.track_running_stats:
                count = n // s * h * w
                with torch.no_grad():
                    self.running_mean.lerp_(mean.view(s, c).mean(0), momentum)
                    self.running_var.lerp_(var.view(s, c).mean(0) * (count / (count - 1)), momentum)
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
        # group j of the interleaved batch = channels [j*c, (j+1)*c) of this free view
        track = self.track_running_stats
        running_mean = self.running_mean.repeat(s) if track else None
        running_var = self.running_var.repeat(s) if track else None
        out = F.batch_norm(
            x.contiguous().view(n // s, s * c, h, w),
            running_mean,
            running_var,
            self.weight.repeat(s) if self.affine else None,
            self.bias.repeat(s) if self.affine else None,
            True,
            momentum,
            self.eps,
        )
        if track:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(s, c).mean(dim=0))
                self.running_var.copy_(running_var.view(s, c).mean(dim=0))
        return out.view(n, c, h, w)

    def _momentum(self) -> float:
        """Count this batch and return the momentum nn.BatchNorm2d would use for it."""
        if not self.track_running_stats:
            return 0.0
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
