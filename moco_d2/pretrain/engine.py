"""One pretraining epoch: forward, InfoNCE loss, SGD step, progress bar and scalars."""

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from moco_d2.errors import UserError
from moco_d2.training.distributed import get_world_size, is_distributed
from moco_d2.training.logs import ACC1, IMG_PER_S, LOSS, LR
from moco_d2.training.meters import AverageMeter, ThroughputMeter, accuracy

logger = logging.getLogger("moco_d2.pretrain")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: stopping beats writing garbage checkpoints for days."""


def autocast_context(device, amp):
    """bf16 autocast when ``amp`` and the device supports it, else a no-op context."""
    if not amp:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("--amp: this GPU has no bf16 support; training in fp32")
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _all_finite(loss):
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_one_epoch(
    model,
    loader,
    optimizer,
    epoch,
    device,
    lr,
    amp=False,
    writer=None,
    print_freq=10,
    show_progress=True,
):
    """Train for one pass over ``loader``; return the epoch's mean loss, acc1, img/s, unreadable."""
    model.train()
    losses = AverageMeter(LOSS, ":.4f")
    top1 = AverageMeter(ACC1, ":.2f")
    speed = ThroughputMeter()
    unreadable = 0
    world = get_world_size()
    iters = len(loader)
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}",
        total=iters,
        disable=not show_progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    for i, (images, _, skipped) in enumerate(bar):
        unreadable += int(skipped.sum())
        im_q = images[0].to(device, non_blocking=True)
        im_k = images[1].to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits, labels = model(im_q, im_k)
            loss = F.cross_entropy(logits.float(), labels)
        if not _all_finite(loss):
            raise TrainingDiverged(
                f"non-finite loss ({loss.item()}) at epoch {epoch}, iteration {i}, lr {lr:.4g}: "
                "lower --lr, check the data, or try without --amp; the last checkpoint is intact"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        batch = im_q.shape[0]
        losses.update(loss.item(), batch)
        top1.update(accuracy(logits, labels)[0].item(), batch)
        speed.update(batch * world)
        bar.set_postfix(
            loss=f"{losses.avg:.4f}", lr=f"{lr:.4g}", img_s=f"{speed.rate:.1f}", refresh=False
        )
        if writer is not None and (i % print_freq == 0 or i == iters - 1):
            step = epoch * iters + i
            writer.add_scalar(f"train/{LOSS}", loss.item(), step)
            writer.add_scalar(f"train/{ACC1}", top1.val, step)
            writer.add_scalar(f"train/{LR}", lr, step)
            writer.add_scalar(f"train/{IMG_PER_S}", speed.rate, step)
    bar.close()
    if is_distributed():
        count = torch.tensor([unreadable], device=device)
        dist.all_reduce(count)
        unreadable = int(count.item())
    return {LOSS: losses.avg, ACC1: top1.avg, IMG_PER_S: speed.rate, "unreadable": unreadable}
