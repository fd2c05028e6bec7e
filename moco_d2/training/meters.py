"""Running averages, throughput and top-k accuracy for training logs."""

import time
from collections.abc import Sequence

import torch


class AverageMeter:
    """Current value, sum, count and average of a scalar."""

    def __init__(self, name: str = "", fmt: str = ":f") -> None:
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


class ThroughputMeter:
    """Images per second since the last ``reset`` (excludes nothing: data loading counts)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def update(self, n: int) -> None:
        self.images += n

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0


@torch.no_grad()
def accuracy(
    output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)
) -> list[torch.Tensor]:
    """Top-k accuracies in percent, one per k, as in the released code."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.reshape(1, -1).expand_as(pred.t()))
    batch = target.shape[0]
    return [correct[: min(k, maxk)].reshape(-1).float().sum() * (100.0 / batch) for k in topk]
