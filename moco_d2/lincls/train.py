"""The linear-classification run: data, frozen model, epochs, checkpoints, final JSON."""

import argparse
import logging
import os
import shutil
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from moco_d2.convert.layouts import IMAGENET
from moco_d2.convert.trunk import is_moco_checkpoint, read_trunk
from moco_d2.errors import UserError
from moco_d2.io import atomic_path, atomic_torch_save, atomic_write_json, remove_stale_temporaries
from moco_d2.lincls.data import build_datasets
from moco_d2.lincls.engine import evaluate, train_one_epoch
from moco_d2.lincls.loading import check_backbone_unchanged, check_resumed_backbone, load_pretrained
from moco_d2.lincls.model import build_model, build_optimizer, unwrap
from moco_d2.training.amp import bf16_supported
from moco_d2.training.checkpoint import (
    add_module_prefix,
    get_rng_state,
    load_checkpoint,
    seed_all,
    set_rng_state,
    strip_module_prefix,
)
from moco_d2.training.cli_args import per_process_batch
from moco_d2.training.distributed import (
    barrier,
    cleanup,
    init_process,
    is_main_process,
    procs_per_node,
)
from moco_d2.training.logs import (
    ACC1,
    ACC5,
    LR,
    TRAIN_ACC1,
    TRAIN_LOSS,
    setup_logging,
    teardown_logging,
)
from moco_d2.training.schedule import adjust_learning_rate

LAST_CHECKPOINT = "checkpoint.pth.tar"
BEST_CHECKPOINT = "model_best.pth.tar"
RESULTS = "results.json"
EVALUATION = "evaluation.json"  # -e/--evaluate: kept apart so it never replaces a run's results
# Per-epoch counts of unreadable images (history, TensorBoard, JSON): train ones were replaced by
# the next readable image, val ones left out of top-1/top-5.
TRAIN_UNREADABLE = "train_unreadable"
VAL_UNREADABLE = "val_unreadable"

logger = logging.getLogger("moco_d2.lincls")

Prepared = tuple[Dataset, Dataset, nn.Module, dict | None]


def prepare(args: argparse.Namespace) -> Prepared:
    """Datasets, the model with its pretrained (or resumed) weights, and the --resume checkpoint.

    Everything a user's input can break happens here, once before any process is spawned, so
    bad input fails as one line in every launch mode. Images are normalised as the pretrained
    weights expect (``--input-norm``, else what their layout says, else ImageNet mean/std).
    """
    trunk = read_trunk(args.pretrained, args.trunk) if args.pretrained else None
    input_norm = args.input_norm or (trunk and trunk.input_norm) or IMAGENET
    train_set, val_set = build_datasets(args.data, args.crop_size, args.resize, input_norm)
    model = build_model(args.arch, num_classes=len(train_set.classes))
    pretrained = load_pretrained(model, args.pretrained, args.arch, trunk) if trunk else None
    resumed = _load_resume(args.resume, model, args) if args.resume else None
    if resumed is not None and pretrained is not None:
        check_resumed_backbone(model, pretrained, args.resume, args.pretrained)
    return train_set, val_set, model, resumed


def finished(prepared: Prepared, args: argparse.Namespace) -> bool:
    """True (and says so) when --resume names a run that already trained all --epochs."""
    resumed = prepared[3]
    if resumed is None or args.evaluate or resumed["epoch"] < args.epochs:
        return False
    print(
        f"nothing to do: --resume {args.resume} already finished epoch {resumed['epoch']} "
        f"of --epochs {args.epochs} (raise --epochs to train longer, or use -e to evaluate)"
    )
    return True


def worker(
    local_rank: int | None, args: argparse.Namespace, prepared: Prepared | None = None
) -> None:
    """One process of the run (see :func:`moco_d2.training.distributed.launch`)."""
    device = init_process(local_rank, args)
    is_main = args.rank == 0
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    handlers = setup_logging(args.output_dir if is_main else None, is_main)
    try:
        _run(device, args, prepared or prepare(args))
    finally:
        teardown_logging(handlers)
        cleanup()


def _loaders(train_set, val_set, args):
    # -b is one node's batch, -j each process's workers, as in the released main_lincls.py.
    per_process = per_process_batch(args.batch_size, procs_per_node(args))
    workers = args.workers
    sampler = DistributedSampler(train_set) if args.distributed else None
    # Val: a strided shard per process, no padding, so the summed counts are exact.
    val_shard = (
        Subset(val_set, range(args.rank, len(val_set), args.world_size))
        if args.distributed
        else val_set
    )
    pin = torch.cuda.is_available()
    train_loader = DataLoader(
        train_set,
        per_process,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=False,
    )
    val_loader = DataLoader(
        val_shard, per_process, shuffle=False, num_workers=workers, pin_memory=pin
    )
    return train_loader, val_loader, sampler


def _load_resume(path, model, args):
    """Load the model weights of a checkpoint of this tool; return the checkpoint for the rest."""
    checkpoint = load_checkpoint(path)
    if is_moco_checkpoint(checkpoint):
        raise UserError(
            f"--resume {path} is a MoCo pretraining checkpoint, not a tools/lincls.py one: "
            "pass it as --pretrained"
        )
    if checkpoint.get("arch") != args.arch:
        raise UserError(
            f"--resume {path} is a {checkpoint.get('arch')} run, but -a/--arch is {args.arch}"
        )
    state = checkpoint.get("state_dict")
    state = strip_module_prefix(state) if isinstance(state, dict) else {}
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != v.shape for k, v in own.items()):
        raise UserError(
            f"--resume {path} is not a tools/lincls.py checkpoint of {args.arch} "
            f"with {model.fc.out_features} classes"
        )
    model.load_state_dict(state)
    return checkpoint


def _restore(checkpoint, optimizer):
    """Optimizer, next epoch, best top-1, history and RNG of a resumed run."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
    return (
        checkpoint["epoch"],
        checkpoint.get("best_acc1", 0.0),
        list(checkpoint.get("history", [])),
    )


def _summary_writer(args):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(args.output_dir, "tb"))


def _run(device, args, prepared):
    if args.seed is not None:
        seed_all(args.seed)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_set, val_set, model, resumed = prepared
    amp = args.amp and bf16_supported(device)
    if args.amp and not amp:
        logger.warning("--amp: %s has no bf16 support; running in fp32", device)
    args.amp = amp
    model.to(device)
    if args.distributed:
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay)
    progress = (args.start_epoch, 0.0, []) if resumed is None else _restore(resumed, optimizer)
    loaders = _loaders(train_set, val_set, args)
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        for path in remove_stale_temporaries(args.output_dir):
            logger.info("removed %s, left by an interrupted write", path)

    if args.evaluate:
        acc1, acc5, val_unreadable = evaluate(model, loaders[1], device, args.amp)
        if is_main_process():
            logger.info("val: top-1 %.2f  top-5 %.2f", acc1, acc5)
            _log_val_unreadable("val", val_unreadable)
            _write_results(
                args,
                {"resume": args.resume, ACC1: acc1, ACC5: acc5, VAL_UNREADABLE: val_unreadable},
                EVALUATION,
            )
        return
    history = _fit(model, optimizer, loaders, device, progress, args)
    barrier()
    if is_main_process():
        _finish(model, history, args)


def _fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loaders: tuple[DataLoader, DataLoader, DistributedSampler | None],
    device: torch.device,
    progress: tuple[int, float, list[dict]],
    args: argparse.Namespace,
) -> list[dict]:
    """The epochs: train the fc, evaluate, log to TensorBoard, checkpoint (main process
    writes). ``progress`` is (first epoch, best top-1, history so far); returns the history."""
    train_loader, val_loader, sampler = loaders
    start_epoch, best_acc1, history = progress
    criterion = nn.CrossEntropyLoss()
    writer = _summary_writer(args) if is_main_process() else None
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = adjust_learning_rate(optimizer, epoch, args)
        loss, train_acc1, train_unreadable = train_one_epoch(
            model, train_loader, criterion, optimizer, device, epoch, args
        )
        acc1, acc5, val_unreadable = evaluate(model, val_loader, device, args.amp)
        is_best = acc1 > best_acc1 or not history
        best_acc1 = max(acc1, best_acc1)
        # train_loss/train_acc1 are the main process's share; acc1/acc5 cover the readable
        # images of the whole val set; the unreadable counts cover every process.
        history.append(
            {
                "epoch": epoch,
                LR: lr,
                TRAIN_LOSS: loss,
                TRAIN_ACC1: train_acc1,
                ACC1: acc1,
                ACC5: acc5,
                TRAIN_UNREADABLE: train_unreadable,
                VAL_UNREADABLE: val_unreadable,
            }
        )
        if writer is None:
            continue
        logger.info(
            "epoch %d: lr %g  loss %.4f  val top-1 %.2f  top-5 %.2f  (best %.2f)",
            epoch,
            lr,
            loss,
            acc1,
            acc5,
            best_acc1,
        )
        if train_unreadable:
            logger.warning(
                "epoch %d: %d unreadable train images were replaced by the next readable one "
                "(paths above in the log)",
                epoch,
                train_unreadable,
            )
        _log_val_unreadable(f"epoch {epoch}", val_unreadable)
        for name, value in history[-1].items():
            if name != "epoch":
                writer.add_scalar(name, value, epoch)
        writer.flush()
        _save(model, optimizer, epoch, best_acc1, history, is_best, args)
    if writer is not None:
        writer.close()
    return history


def _log_val_unreadable(when: str, count: int) -> None:
    if count:
        logger.warning(
            "%s: %d unreadable val images were left out: top-1/top-5 are over the readable "
            "ones (paths above in the log)",
            when,
            count,
        )


def _finish(model, history, args):
    """The sanity check that the backbone is the pretrained one, then results.json."""
    if args.pretrained:
        check_backbone_unchanged(unwrap(model), args.pretrained, args.trunk)
        logger.info("sanity check passed: backbone weights equal %s", args.pretrained)
    best = max(history, key=lambda h: h[ACC1]) if history else {}
    last = history[-1] if history else {}
    _write_results(
        args,
        {
            "best_acc1": best.get(ACC1),
            "best_epoch": best.get("epoch"),
            ACC1: last.get(ACC1),
            ACC5: last.get(ACC5),
            VAL_UNREADABLE: last.get(VAL_UNREADABLE),
            "backbone_unchanged": True if args.pretrained else None,
            "history": history,
        },
    )


def _save(model, optimizer, epoch, best_acc1, history, is_best, args):
    """The latest state (for --resume) and a copy as the best one; both writes are atomic."""
    state = {
        "epoch": epoch + 1,
        "arch": args.arch,
        "state_dict": add_module_prefix(unwrap(model).state_dict()),
        "optimizer": optimizer.state_dict(),
        "best_acc1": best_acc1,
        "history": history,
        "rng": get_rng_state(),
    }
    last = os.path.join(args.output_dir, LAST_CHECKPOINT)
    atomic_torch_save(state, last)
    if is_best:
        with atomic_path(os.path.join(args.output_dir, BEST_CHECKPOINT)) as tmp:
            shutil.copyfile(last, tmp)


def _write_results(args: argparse.Namespace, results: dict[str, Any], name: str = RESULTS) -> None:
    """``results.json`` (or ``evaluation.json``) as strict JSON, with the run's settings."""
    meta = {
        "arch": args.arch,
        "pretrained": args.pretrained or None,
        "data": args.data,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "amp": args.amp,
    }
    atomic_write_json({**meta, **results}, os.path.join(args.output_dir, name))
