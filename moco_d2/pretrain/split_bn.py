"""SplitBatchNorm: one process imitating the per-GPU BatchNorm of multi-GPU training.

In training mode the batch is cut into ``num_splits`` contiguous groups (like the per-GPU
slices of a distributed batch) and each group is normalised with its own statistics. Running
statistics are the average over groups; evaluation is ordinary BatchNorm, and the state_dict is
exactly BatchNorm2d's, so checkpoints stay interchangeable.
"""

import torch
import torch.nn.functional as F
from torch import nn


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
        # group g = samples [g*n/s, (g+1)*n/s): lay the groups side by side along channels
        grouped = x.reshape(s, n // s, c, h, w).transpose(0, 1).reshape(n // s, s * c, h, w)
        track = self.track_running_stats
        running_mean = self.running_mean.repeat(s) if track else None
        running_var = self.running_var.repeat(s) if track else None
        momentum = self.momentum or 0.0
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
                momentum = 1.0 / float(self.num_batches_tracked)
        out = F.batch_norm(
            grouped,
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
        return out.reshape(n // s, s, c, h, w).transpose(0, 1).reshape(n, c, h, w)


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
        )
        split.load_state_dict(module.state_dict())
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits))
    return module
