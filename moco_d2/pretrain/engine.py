"""One pretraining epoch: forward, InfoNCE loss, SGD step, progress bar and scalars.

The step itself never waits for the device: loss and accuracy stay on the device and are read,
checked and logged every ``print_freq`` iterations (``sync_every_step`` restores the released
per-step ``.item()`` for comparison).
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from moco_d2.pretrain.health import HealthMonitor, TrainingDiverged
from moco_d2.training.amp import autocast
from moco_d2.training.distributed import get_world_size, is_distributed
from moco_d2.training.logs import ACC1, IMG_PER_S, LOSS, LR
from moco_d2.training.meters import ThroughputMeter

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger("moco_d2.pretrain")

__all__ = ["StepResult", "TrainingDiverged", "train_one_epoch", "train_step", "views_to_device"]


def views_to_device(
    images: torch.Tensor | Sequence[torch.Tensor],
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key batches on ``device``: from the loader's ``[q, k]`` pair, or augmented
    here from uint8 crops ``(N, 2, 3, H, W)`` (query crops first, so both use the same RNG
    order on every device)."""
    if augment is None:
        im_q = images[0].to(device, non_blocking=True)
        im_k = images[1].to(device, non_blocking=True)
    else:
        crops = images.to(device, non_blocking=True)
        im_q, im_k = augment(crops[:, 0]), augment(crops[:, 1])
    if channels_last:
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
    return im_q, im_k


class StepResult(NamedTuple):
    """What a step leaves for the logs: device tensors, and host counts."""

    loss: torch.Tensor  # 0-dim, detached
    acc1: torch.Tensor  # 0-dim, percent
    images: int
    unreadable: int  # files that ``decode`` found unreadable (the loader's come with the batch)


def train_step(
    model: torch.nn.Module,
    images: Any,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: bool = False,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels_last: bool = False,
    decode: Callable[[Any, torch.device], tuple[torch.Tensor, int]] | None = None,
    check_loss: Callable[[torch.Tensor], None] | None = None,
) -> StepResult:
    """One step on the loader's ``images``: decode (``--decode-on device``), views, forward,
    InfoNCE, backward, SGD. The host never waits for the device in it, except inside
    ``decode_jpeg`` and in ``check_loss`` (the released per-step ``.item()``, called between
    forward and backward)."""
    unreadable = 0
    if decode is not None:
        images, unreadable = decode(images, device)
    im_q, im_k = views_to_device(images, device, augment, channels_last)
    with autocast(device, amp):
        logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits.float(), labels)
    if check_loss is not None:
        check_loss(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    acc1 = (logits.detach().argmax(dim=1) == labels).float().mean() * 100
    return StepResult(loss.detach(), acc1, im_q.shape[0], unreadable)


def _all_finite(values: torch.Tensor) -> bool:
    finite = torch.isfinite(values.detach()).all().to(torch.int32).reshape(1)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _check_finite(loss: torch.Tensor, epoch: int, i: int, lr: float) -> None:
    if not _all_finite(loss):
        raise TrainingDiverged(_non_finite(loss.item(), epoch, i, i, lr))


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    device: torch.device,
    lr: float,
    amp: bool = False,
    writer: "SummaryWriter | None" = None,
    print_freq: int = 10,
    show_progress: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels_last: bool = False,
    sync_every_step: bool = False,
    health: HealthMonitor | None = None,
    decode: Callable[[Any, torch.device], tuple[torch.Tensor, int]] | None = None,
) -> dict:
    """Train for one pass over ``loader``; return the epoch's mean loss, acc1, img/s,
    unreadable count and the per-iteration losses.

    ``decode`` turns a batch of encoded images into uint8 crops on the device and says how many
    it found unreadable (``--decode-on device``); they count with the loader's."""
    model.train()
    speed = ThroughputMeter()
    world = get_world_size()
    iters = len(loader)
    step_loss = torch.zeros(iters, device=device)
    step_acc = torch.zeros(iters, device=device)
    unreadable = torch.zeros((), dtype=torch.long)
    losses: list[float] = []
    acc1: list[float] = []
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}",
        total=iters,
        disable=not show_progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    start = 0
    for i, (images, _, skipped) in enumerate(bar):
        check = partial(_check_finite, epoch=epoch, i=i, lr=lr) if sync_every_step else None
        result = train_step(
            model, images, optimizer, device, amp, augment, channels_last, decode, check
        )
        unreadable += skipped.sum() + result.unreadable
        step_loss[i] = result.loss
        step_acc[i] = result.acc1
        speed.update(result.images * world)
        if sync_every_step or (i + 1) % print_freq == 0 or i == iters - 1:
            window = step_loss[start : i + 1]
            if not _all_finite(window):
                raise TrainingDiverged(_non_finite(window.max().item(), epoch, start, i, lr))
            losses += window.tolist()
            acc1 += step_acc[start : i + 1].tolist()
            start = i + 1
            scalars = health.check(f"at epoch {epoch}, iteration {i}") if health else {}
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}", lr=f"{lr:.4g}", img_s=f"{speed.rate:.1f}", refresh=False
            )
            if writer is not None:
                step = epoch * iters + i
                writer.add_scalar(f"train/{LOSS}", losses[-1], step)
                writer.add_scalar(f"train/{ACC1}", acc1[-1], step)
                writer.add_scalar(f"train/{LR}", lr, step)
                writer.add_scalar(f"train/{IMG_PER_S}", speed.rate, step)
                for name, value in scalars.items():
                    writer.add_scalar(f"train/{name}", value, step)
    bar.close()
    count = unreadable.to(device).reshape(1)
    if is_distributed():
        dist.all_reduce(count)
    return {
        LOSS: sum(losses) / max(1, len(losses)),
        ACC1: sum(acc1) / max(1, len(acc1)),
        IMG_PER_S: speed.rate,
        "unreadable": int(count.item()),
        "losses": losses,
    }


def _non_finite(value: float, epoch: int, first: int, last: int, lr: float) -> str:
    where = f"iteration {first}" if first == last else f"iterations {first}-{last}"
    return (
        f"non-finite loss ({value}) at epoch {epoch}, {where}, lr {lr:.4g}: lower --lr, check "
        "the data, or try without --amp; the last checkpoint is intact"
    )
