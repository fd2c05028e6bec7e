"""What a pretraining run is built from: data, loader, model, optimizer, the DDP decision.

``tools/pretrain_moco.py`` (:class:`moco_d2.pretrain.main.Pretrainer`) and
``benchmarks/pretrain_throughput.py`` both build their runs with these functions from the
tool's parsed flags, so that the benchmark measures what the tool runs.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, DistributedSampler

from moco_d2.errors import UserError
from moco_d2.pretrain.augment import TwoCropsTransform, moco_augmentation
from moco_d2.pretrain.builder import MoCo
from moco_d2.pretrain.data import EpochLoader, TolerantImageFolder
from moco_d2.pretrain.device_augment import DeviceAugment
from moco_d2.pretrain.device_decode import DeviceDecoder, decode_setup
from moco_d2.pretrain.health import MIN_BN_VALUES, check_bn_groups, last_stage_positions

DEFAULT_BN_SPLITS = 8


def resolve_bn_splits(
    requested: int | None,
    batch: int,
    distributed: bool,
    positions: int = MIN_BN_VALUES,
    crop_size: int = 224,
) -> int:
    """``--bn-splits``, or its default: 1 when distributed, else the largest s <= 8 that splits
    ``batch`` into groups of at least 2 images and ``MIN_BN_VALUES`` values per channel in the
    last stage (``positions`` per image). Refuses groups below that (UserError)."""
    if requested is not None:
        if batch % requested:
            raise UserError(
                f"--bn-splits {requested} does not divide the per-process batch {batch}"
            )
        splits = requested
    elif distributed:
        splits = 1
    else:
        splits = max(
            s
            for s in range(1, DEFAULT_BN_SPLITS + 1)
            if batch % s == 0
            and (s == 1 or (batch // s >= 2 and batch // s * positions >= MIN_BN_VALUES))
        )
    check_bn_groups(batch // splits, positions, splits, crop_size)
    return splits


def bn_splits_for(args: argparse.Namespace, batch: int) -> int:
    """:func:`resolve_bn_splits` for the flags ``args`` and a per-process ``batch``."""
    return resolve_bn_splits(
        args.bn_splits,
        batch,
        args.distributed,
        last_stage_positions(base_encoder(args), args.crop_size),
        args.crop_size,
    )


def base_encoder(args: argparse.Namespace) -> Callable[..., torch.nn.Module]:
    return torchvision.models.__dict__[args.arch]


def compile_encoders(model: MoCo) -> None:
    """torch.compile the two encoders in place (state_dict keys unchanged). The queue logic stays
    eager: compiled whole, the queue's defensive clone could be dropped before its update."""
    model.encoder_q.compile()
    model.encoder_k.compile()


def sgd_kernel(device: torch.device) -> dict:
    """Fused SGD on CUDA (one kernel for all parameters), foreach elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Independent seed for (run seed, epoch, rank) of the training process (key shuffle,
    device augmentation); with the items' own seeds (:mod:`moco_d2.pretrain.data`) each epoch
    depends only on these, which is what makes resuming exact."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@dataclass
class TrainData:
    """What the loader serves and how a collated batch becomes the two views on the device.

    ``dataset`` items are ``(images, target, unreadable)``; ``collate_fn`` None is the
    DataLoader's default; ``augment`` is the device-side step from the batch's images to views
    (None: the workers already made the normalised views); ``decode`` turns a batch of encoded
    JPEGs into uint8 crops on the device first (``--decode-on device``; None otherwise).
    """

    dataset: Dataset
    collate_fn: Callable | None
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    decode: DeviceDecoder | None = None


def build_train_data(args: argparse.Namespace, train_dir: str) -> TrainData:
    """The training images of ``train_dir`` as ``--augment-on`` and ``--decode-on`` want them."""
    if args.augment_on == "device":
        decoding = decode_setup(args.decode_on, args.crop_size, train_dir)
        return TrainData(
            decoding.dataset, decoding.collate_fn, DeviceAugment(args.aug_plus), decoding.decode
        )
    transform = TwoCropsTransform(moco_augmentation(args.aug_plus, args.crop_size))
    return TrainData(TolerantImageFolder(train_dir, transform), None, None)


def build_train_loader(
    data: TrainData,
    args: argparse.Namespace,
    batch: int,
    seed: int,
    device: torch.device,
    across_epochs: bool = True,
) -> EpochLoader:
    """This process's shard of ``data``, ``batch`` images a step, reshuffled every epoch from
    ``seed`` (the same on every rank); see :class:`EpochLoader` for ``across_epochs``."""
    global_batch = batch * args.world_size
    if len(data.dataset) < global_batch:
        raise UserError(
            f"{getattr(data.dataset, 'root', args.data)} has {len(data.dataset)} images, fewer "
            f"than one global batch of {global_batch}"
        )
    sampler = DistributedSampler(
        data.dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=seed
    )
    return EpochLoader(
        data.dataset,
        sampler,
        batch,
        seed,
        args.epochs,
        args.workers,
        pin_memory=device.type == "cuda",
        collate_fn=data.collate_fn,
        across_epochs=across_epochs,
    )


def build_model(
    args: argparse.Namespace, device: torch.device, bn_splits: int, foreach_momentum: bool = True
) -> MoCo:
    """The MoCo model on ``device`` in the ``--channels-last`` format, ``--compile``-d;
    ``foreach_momentum`` False is the released per-parameter momentum loop."""
    model = MoCo(
        base_encoder(args),
        dim=args.moco_dim,
        K=args.moco_k,
        m=args.moco_m,
        T=args.moco_t,
        mlp=args.mlp,
        bn_splits=bn_splits,
        foreach_momentum=foreach_momentum,
    ).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_encoders(model)
    return model


def build_optimizer(
    model: MoCo, args: argparse.Namespace, device: torch.device, kernel: dict | None = None
) -> torch.optim.SGD:
    """SGD over the query encoder; ``kernel`` defaults to :func:`sgd_kernel` (``{"foreach":
    False}`` is the released per-parameter update)."""
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        **(sgd_kernel(device) if kernel is None else kernel),
    )


def wrap_for_training(
    model: MoCo, args: argparse.Namespace, device: torch.device
) -> torch.nn.Module:
    """DDP when the run has several processes; with one process in total, the model itself (no
    process group: the keys are shuffled inside the process over the SplitBatchNorm groups)."""
    if not args.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )


def describe_bn(args: argparse.Namespace, bn_splits: int) -> str:
    """One log line on how this run gets shuffle-BN."""
    if args.distributed:
        return (
            f"{args.world_size} processes: keys shuffled across processes (DDP), "
            f"{bn_splits} BatchNorm group(s) per process"
        )
    if bn_splits == 1:
        return (
            "one process in total: no process group or DDP; plain BatchNorm over the batch "
            "(--bn-splits 1), so no shuffle-BN effect"
        )
    return (
        "one process in total: no process group or DDP; shuffle-BN emulated with "
        f"{bn_splits} BatchNorm groups (--bn-splits)"
    )
