"""One training epoch of the linear classifier, and top-1/top-5 evaluation."""

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from moco_d2.errors import UserError
from moco_d2.launch import Launch, all_gather_cat, autocast, is_distributed

if TYPE_CHECKING:
    from moco_d2.lincls.main import LinclsConfig

ACC1 = "acc1"
ACC5 = "acc5"


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: "LinclsConfig",
    here: Launch,
) -> tuple[float, float, int]:
    """SGD on the fc over ``loader``; returns (mean loss, top-1 %) on this process's share and
    the unreadable images replaced on all processes."""
    # Eval mode for the whole model: the frozen BN layers must use (and keep) the pretrained
    # running statistics. The fc has no train/eval difference, so it still learns.
    model.eval()
    device = here.device
    loss_sum = hits = count = 0.0
    unreadable = torch.zeros(1, dtype=torch.long)
    bar = tqdm(loader, desc=f"train {epoch}", disable=not here.is_main, leave=False)
    for i, (images, target, skipped) in enumerate(bar):
        unreadable += skipped.sum()
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, config.amp):
            output = model(images)
        loss = criterion(output.float(), target)
        _stop_unless_finite(loss, epoch, i, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = images.shape[0]
        loss_sum += loss.item() * n
        hits += accuracy(output, target, topk=(1,))[0].item() * n
        count += n
        if i % config.print_freq == 0:
            bar.set_postfix({"loss": f"{loss_sum / count:.4f}", ACC1: f"{hits / count:.2f}"})
    unreadable = unreadable.to(device)
    if is_distributed():
        torch.distributed.all_reduce(unreadable)
    return loss_sum / max(count, 1), hits / max(count, 1), int(unreadable.item())


def _stop_unless_finite(
    loss: torch.Tensor, epoch: int, iteration: int, config: "LinclsConfig"
) -> None:
    """Stop every process when any process's loss is NaN or infinite: training on would only
    write NaN accuracies. The last checkpoint stays as it is."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if is_distributed():
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise UserError(
            f"linear classification stopped: the loss is not finite ({loss.item():g} on this "
            f"process) at epoch {epoch}, iteration {iteration}; the pretrained features are "
            f"probably broken (check {config.pretrained or 'the pretraining run'}) or --lr "
            f"{config.lr:g} is too high; checkpoints in {config.output_dir} are left as they were"
        )


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Iterable, device: torch.device, amp: bool = False
) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, unreadable images) over the whole val set, summed over every
    process's shard. Items with ``skipped > 0`` stand for unreadable images (their pixels are
    another image's): they are counted and left out, so top-1/top-5 are over the readable ones."""
    model.eval()
    # top-1 hits, top-5 hits, readable images, unreadable images
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    quiet = is_distributed() and torch.distributed.get_rank() != 0
    for images, target, skipped in tqdm(loader, desc="val", leave=False, disable=quiet):
        readable = skipped == 0
        if not readable.all():  # masking copies the batch: only when one is unreadable
            totals[3] += (~readable).sum().item()
            images, target = images[readable], target[readable]
            if not target.numel():
                continue
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images)
        acc1, acc5 = accuracy(output.float(), target, topk=(1, 5))
        n = target.shape[0]
        totals[:3] += torch.stack(
            [acc1 * n / 100, acc5 * n / 100, torch.tensor(n, device=device)]
        ).double()
    hits1, hits5, count, unreadable = all_gather_cat(totals[None]).sum(0).round().tolist()
    if not count:
        raise UserError(
            f"no val image could be read: all {int(unreadable)} were unreadable (paths in the "
            "log), so top-1/top-5 are undefined; check the val folder"
        )
    return 100.0 * hits1 / count, 100.0 * hits5 / count, int(unreadable)
