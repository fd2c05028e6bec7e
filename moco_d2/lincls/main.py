"""`tools/lincls.py`: linear classification on frozen features, the released main_lincls.py.

:func:`main` parses the flags into a frozen :class:`LinclsConfig` and reads every input a user
can get wrong (:func:`prepare`: datasets, pretrained or resumed weights) once, before any process
starts; :func:`run` (each process) then trains the fc epoch by epoch, evaluates, checkpoints, and
ends with the check that the backbone is still the pretrained one and ``results.json``.
"""

import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Sized
from typing import Any, cast

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from moco_d2 import io
from moco_d2.cli import (
    ArgumentParser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    setup_logging,
    teardown_logging,
)
from moco_d2.config import FIXED, FREE, TrainConfig, flag, per_process_batch
from moco_d2.convert import layouts
from moco_d2.convert.trunk import INPUT_NORM_HELP, TRUNK_HELP, is_moco_checkpoint, read_trunk
from moco_d2.errors import UserError
from moco_d2.launch import Launch, bf16_supported, launch, procs_per_node
from moco_d2.lincls.data import build_datasets
from moco_d2.lincls.engine import ACC1, ACC5, evaluate, train_one_epoch
from moco_d2.lincls.loading import check_backbone_unchanged, check_resumed_backbone, load_pretrained
from moco_d2.lincls.model import ARCHS, build_model, build_optimizer, unwrap

LAST_CHECKPOINT = "checkpoint.pth.tar"
BEST_CHECKPOINT = "model_best.pth.tar"
RESULTS = "results.json"
EVALUATION = "evaluation.json"  # -e/--evaluate: kept apart so it never replaces a run's results
# Per-epoch counts of unreadable images (history, TensorBoard, JSON): train ones were replaced by
# the next readable image, val ones left out of top-1/top-5.
TRAIN_UNREADABLE = "train_unreadable"
VAL_UNREADABLE = "val_unreadable"

logger = logging.getLogger("moco_d2.lincls")


@dataclasses.dataclass(frozen=True)
class LinclsConfig(TrainConfig):
    data: str = flag("data", default="", metavar="DIR", help="ImageFolder root with train/, val/")
    arch: str = flag(
        "-a", "--arch", default="resnet50", metavar="ARCH", choices=ARCHS, resume=FIXED,
        help="torchvision model (default: resnet50)",
    )  # fmt: skip
    epochs: int = flag(
        "--epochs", default=100, type=positive_int, metavar="N", resume=FREE,
        help="total epochs (default: %(default)s)",
    )  # fmt: skip
    lr: float = flag(
        "--lr", "--learning-rate", default=30.0, type=positive_float, metavar="LR", resume=FIXED,
        help="initial learning rate (default: 30)",
    )  # fmt: skip
    schedule: tuple[int, ...] = flag(
        "--schedule", default=(60, 80), nargs="*", type=non_negative_int, metavar="EPOCH",
        resume=FIXED, help="epochs at which the lr is multiplied by 0.1 (default: %(default)s)",
    )  # fmt: skip
    weight_decay: float = flag(
        "--wd", "--weight-decay", default=0.0, type=non_negative_float, metavar="W", resume=FIXED,
        help="weight decay (default: %(default)s)",
    )  # fmt: skip
    resume: str = flag(
        "--resume", default="", metavar="PATH",
        help="path to a checkpoint.pth.tar of this tool to continue from",
    )  # fmt: skip
    seed: int | None = flag(
        "--seed", default=None, type=non_negative_int, help="seed for initializing training"
    )
    evaluate: bool = flag(
        "-e", "--evaluate", default=False, action="store_true", help="only evaluate on val/"
    )
    pretrained: str = flag(
        "--pretrained", default="", metavar="PATH",
        help="pretrained checkpoint: ours, another release's (those the converter reads), or a "
        "torchvision state_dict",
    )  # fmt: skip
    trunk: str | None = flag("--trunk", default=None, metavar="PREFIX", help=TRUNK_HELP)
    input_norm: str | None = flag(
        "--input-norm", default=None, choices=sorted(layouts.INPUT_NORMS), help=INPUT_NORM_HELP
    )
    output_dir: str = flag(
        "--output-dir", default="output/lincls", metavar="DIR",
        help="checkpoints, log.txt, TensorBoard logs and results.json (default: output/lincls)",
    )  # fmt: skip
    crop_size: int = flag(
        "--crop-size", default=224, type=positive_int, metavar="PX", resume=FIXED,
        help="train RandomResizedCrop and val CenterCrop size (default: 224)",
    )  # fmt: skip
    resize: int = flag(
        "--resize", default=256, type=positive_int, metavar="PX", resume=FIXED,
        help="val Resize before the center crop (default: 256)",
    )  # fmt: skip

    @classmethod
    def parse(cls, argv: list[str]) -> "LinclsConfig":
        parser = ArgumentParser(
            prog="lincls.py",
            description="Linear classification on frozen features of a pretrained ResNet "
            "(MoCo protocol)",
            epilog="-b is the batch of one node, split evenly over its processes, and -j the "
            "data-loading workers of each process, as in the released main_lincls.py.",
        )
        cls.add_arguments(parser)
        config = cls.from_args(parser.parse_args(argv))
        if config.evaluate and not config.resume:
            raise UserError("-e/--evaluate needs a trained classifier: pass --resume PATH")
        per_process_batch(config.batch_size, max(procs_per_node(config), 1))
        return config


Prepared = tuple[Dataset, Dataset, nn.Module, dict | None]


def main(argv: list[str]) -> int:
    config = LinclsConfig.parse(argv)
    prepared = prepare(config)  # bad input fails here, once, before any process is spawned
    if finished(prepared, config):
        return 0
    # A launch of one process in total runs here and reuses what was prepared; spawned workers
    # prepare their own (a model and datasets do not travel well).
    spawns = (
        config.multiprocessing_distributed
        and procs_per_node(config) * max(config.world_size, 1) > 1
    )
    launch(functools.partial(run, prepared=None if spawns else prepared), config)
    return 0


def prepare(config: LinclsConfig) -> Prepared:
    """Datasets, the model with its pretrained (or resumed) weights, and the --resume checkpoint.

    Images are normalised as the pretrained weights expect (``--input-norm``, else what their
    layout says, else ImageNet mean/std)."""
    trunk = read_trunk(config.pretrained, config.trunk) if config.pretrained else None
    input_norm = config.input_norm or (trunk and trunk.input_norm) or layouts.IMAGENET
    train_set, val_set = build_datasets(config.data, config.crop_size, config.resize, input_norm)
    model = build_model(config.arch, num_classes=len(train_set.classes))
    pretrained = load_pretrained(model, config.pretrained, config.arch, trunk) if trunk else None
    resumed = _load_resume(config, model) if config.resume else None
    if resumed is not None and pretrained is not None:
        check_resumed_backbone(model, pretrained, config.resume, config.pretrained)
    return train_set, val_set, model, resumed


def finished(prepared: Prepared, config: LinclsConfig) -> bool:
    """True (and says so) when --resume names a run that already trained all --epochs."""
    resumed = prepared[3]
    if resumed is None or config.evaluate or resumed["epoch"] < config.epochs:
        return False
    print(
        f"nothing to do: --resume {config.resume} already finished epoch {resumed['epoch']} "
        f"of --epochs {config.epochs} (raise --epochs to train longer, or use -e to evaluate)"
    )
    return True


def _load_resume(config: LinclsConfig, model: nn.Module) -> dict[str, Any]:
    """Load the model weights of a checkpoint of this tool; return the checkpoint for the rest."""
    path = config.resume
    checkpoint = io.load_checkpoint(path)
    if is_moco_checkpoint(checkpoint):
        raise UserError(
            f"--resume {path} is a MoCo pretraining checkpoint, not a tools/lincls.py one: "
            "pass it as --pretrained"
        )
    if checkpoint.get("arch") != config.arch:
        raise UserError(
            f"--resume {path} is a {checkpoint.get('arch')} run, but -a/--arch is {config.arch}"
        )
    state = checkpoint.get("state_dict")
    state = io.strip_module_prefix(state) if isinstance(state, dict) else {}
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != v.shape for k, v in own.items()):
        raise UserError(
            f"--resume {path} is not a tools/lincls.py checkpoint of {config.arch} "
            f"with {cast(nn.Linear, model.fc).out_features} classes"
        )
    refused, _ = config.diff(checkpoint.get("config", {}))
    if refused and not config.evaluate:
        raise UserError(
            f"--resume {path}: the run was started with other settings: {', '.join(refused)}; "
            "resume with that run's flags, or start a new --output-dir"
        )
    model.load_state_dict(state)
    return checkpoint


def run(flags: LinclsConfig, here: Launch, prepared: Prepared | None = None) -> None:
    """One process of the run."""
    config = dataclasses.replace(flags, amp=flags.amp and bf16_supported(here.device))
    if here.is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        for path in io.remove_stale_temporaries(config.output_dir):
            logger.info("removed %s, left by an interrupted write", path)
    handlers = setup_logging(config.output_dir if here.is_main else None, here.is_main)
    try:
        if flags.amp and not config.amp:
            logger.warning("--amp: %s has no bf16 support; running in fp32", here.device)
        _run(config, here, prepared or prepare(config))
    finally:
        teardown_logging(handlers)


def _loaders(
    train_set: Dataset, val_set: Dataset, config: LinclsConfig, here: Launch
) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    # -b is one node's batch, -j each process's workers, as in the released main_lincls.py.
    batch = per_process_batch(config.batch_size, here.procs_per_node)
    sampler: DistributedSampler | None = DistributedSampler(train_set) if here.distributed else None
    # Val: a strided shard per process, no padding, so the summed counts are exact.
    val_size = len(cast(Sized, val_set))  # an image folder: map-style, with a length
    val_shard = Subset(val_set, range(here.rank, val_size, here.world_size))
    pin = here.device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch, shuffle=sampler is None, sampler=sampler,
        num_workers=config.workers, pin_memory=pin,
    )  # fmt: skip
    val_loader = DataLoader(val_shard, batch, num_workers=config.workers, pin_memory=pin)
    return train_loader, val_loader, sampler


def _run(config: LinclsConfig, here: Launch, prepared: Prepared) -> None:
    device = here.device
    if config.seed is not None:
        io.seed_all(config.seed)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_set, val_set, model, resumed = prepared
    model.to(device)
    if here.distributed:
        model = DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, config.lr, config.momentum, config.weight_decay)
    start, best_acc1, history = config.start_epoch, 0.0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if "rng" in resumed:
            io.set_rng_state(resumed["rng"])
        start, best_acc1 = resumed["epoch"], resumed.get("best_acc1", 0.0)
        history = list(resumed.get("history", []))
    train_loader, val_loader, sampler = _loaders(train_set, val_set, config, here)
    if config.evaluate:
        acc1, acc5, val_unreadable = evaluate(model, val_loader, device, config.amp)
        if here.is_main:
            logger.info("val: top-1 %.2f  top-5 %.2f", acc1, acc5)
            _log_val_unreadable("val", val_unreadable)
            results = {"resume": config.resume, ACC1: acc1, ACC5: acc5}
            _write_results(config, {**results, VAL_UNREADABLE: val_unreadable}, EVALUATION)
        return
    writer = None
    if here.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(config.output_dir, "tb"))
    criterion = nn.CrossEntropyLoss()
    for epoch in range(start, config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = config.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, train_acc1, train_unreadable = train_one_epoch(
            model, train_loader, criterion, optimizer, epoch, config, here
        )
        acc1, acc5, val_unreadable = evaluate(model, val_loader, device, config.amp)
        is_best = acc1 > best_acc1 or not history
        best_acc1 = max(acc1, best_acc1)
        # train_loss/train_acc1 are the main process's share; acc1/acc5 cover the readable
        # images of the whole val set; the unreadable counts cover every process.
        history.append(
            {
                "epoch": epoch, "lr": lr, "train_loss": loss, "train_acc1": train_acc1,
                ACC1: acc1, ACC5: acc5, TRAIN_UNREADABLE: train_unreadable,
                VAL_UNREADABLE: val_unreadable,
            }
        )  # fmt: skip
        if writer is None:
            continue
        logger.info(
            "epoch %d: lr %g  loss %.4f  val top-1 %.2f  top-5 %.2f  (best %.2f)",
            epoch, lr, loss, acc1, acc5, best_acc1,
        )  # fmt: skip
        if train_unreadable:
            logger.warning(
                "epoch %d: %d unreadable train images were replaced by the next readable one "
                "(paths above in the log)",
                epoch, train_unreadable,
            )  # fmt: skip
        _log_val_unreadable(f"epoch {epoch}", val_unreadable)
        for name, value in history[-1].items():
            if name != "epoch":
                writer.add_scalar(name, value, epoch)
        writer.flush()
        _save(model, optimizer, epoch, best_acc1, history, is_best, config)
    if writer is not None:
        writer.close()
    if here.distributed:
        torch.distributed.barrier()
    if here.is_main:
        _finish(model, history, config)


def _log_val_unreadable(when: str, count: int) -> None:
    if count:
        logger.warning(
            "%s: %d unreadable val images were left out: top-1/top-5 are over the readable "
            "ones (paths above in the log)",
            when,
            count,
        )


def _finish(model: nn.Module, history: list[dict], config: LinclsConfig) -> None:
    """The sanity check that the backbone is the pretrained one, then results.json."""
    if config.pretrained:
        check_backbone_unchanged(unwrap(model), config.pretrained, config.trunk)
        logger.info("sanity check passed: backbone weights equal %s", config.pretrained)
    best = max(history, key=lambda h: h[ACC1]) if history else {}
    last = history[-1] if history else {}
    results = {
        "best_acc1": best.get(ACC1),
        "best_epoch": best.get("epoch"),
        ACC1: last.get(ACC1),
        ACC5: last.get(ACC5),
        VAL_UNREADABLE: last.get(VAL_UNREADABLE),
        "backbone_unchanged": True if config.pretrained else None,
        "history": history,
    }
    _write_results(config, results)


def _save(model, optimizer, epoch, best_acc1, history, is_best, config: LinclsConfig) -> None:
    """The latest state (for --resume) and a copy as the best one; both writes are atomic."""
    state = {
        "epoch": epoch + 1,
        "arch": config.arch,
        "state_dict": io.add_module_prefix(unwrap(model).state_dict()),
        "optimizer": optimizer.state_dict(),
        "config": config.to_dict(),
        "best_acc1": best_acc1,
        "history": history,
        "rng": io.get_rng_state(),
    }
    last = os.path.join(config.output_dir, LAST_CHECKPOINT)
    io.atomic_torch_save(state, last)
    if is_best:
        with io.atomic_path(os.path.join(config.output_dir, BEST_CHECKPOINT)) as tmp:
            shutil.copyfile(last, tmp)


def _write_results(config: LinclsConfig, results: dict[str, Any], name: str = RESULTS) -> None:
    """``results.json`` (or ``evaluation.json``) as strict JSON, with the run's settings."""
    meta = {
        "arch": config.arch, "pretrained": config.pretrained or None, "data": config.data,
        "epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size,
        "amp": config.amp,
    }  # fmt: skip
    io.atomic_write_json({**meta, **results}, os.path.join(config.output_dir, name))
