"""Per-epoch learning-rate schedules of the released MoCo code (cosine, or ×0.1 steps)."""

import math


def cosine_lr(base_lr, epoch, epochs):
    """lr·0.5·(1+cos(π·epoch/epochs)): the MoCo v2 schedule."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def step_lr(base_lr, epoch, milestones, gamma=0.1):
    """lr multiplied by ``gamma`` once for every milestone already reached."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def lr_at_epoch(base_lr, epoch, epochs, cos=False, milestones=()):
    return cosine_lr(base_lr, epoch, epochs) if cos else step_lr(base_lr, epoch, milestones)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def adjust_learning_rate(optimizer, epoch, args):
    """Released-code helper: reads ``args.lr``, ``args.epochs``, ``args.cos``, ``args.schedule``."""
    lr = lr_at_epoch(args.lr, epoch, args.epochs, getattr(args, "cos", False), args.schedule)
    set_lr(optimizer, lr)
    return lr
