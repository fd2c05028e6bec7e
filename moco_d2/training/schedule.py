"""Per-epoch learning-rate schedules of the released MoCo code (cosine, or ×0.1 steps)."""

import argparse
import math
from collections.abc import Sequence

import torch


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """lr·0.5·(1+cos(π·epoch/epochs)): the MoCo v2 schedule."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def step_lr(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """lr multiplied by ``gamma`` once for every milestone already reached."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def lr_at_epoch(
    base_lr: float, epoch: int, epochs: int, cos: bool = False, milestones: Sequence[int] = ()
) -> float:
    return cosine_lr(base_lr, epoch, epochs) if cos else step_lr(base_lr, epoch, milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer, epoch: int, args: argparse.Namespace
) -> float:
    """Released-code helper: reads ``args.lr``, ``args.epochs``, ``args.cos``, ``args.schedule``."""
    lr = lr_at_epoch(args.lr, epoch, args.epochs, getattr(args, "cos", False), args.schedule)
    set_lr(optimizer, lr)
    return lr
