"""`tools/pretrain_moco.py`: MoCo v1/v2 pretraining with the released main_moco.py flags.

The story of a run, in the order it happens: :func:`main` parses the flags into a frozen
:class:`PretrainConfig` and launches; :func:`run` (each process) resolves the config against the
launch and any ``--resume`` checkpoint, builds the data, model and optimizer
(:class:`Pretrainer`), and trains epoch by epoch (:meth:`Pretrainer.train_epoch`, one
:func:`train_step` per batch), checking the model's health and saving a checkpoint in the
released layout after each epoch.

Defaults are MoCo v2 (MLP head, aug+, cosine schedule, T=0.2); the released v2 command line
(``--mlp --aug-plus --cos --moco-t 0.2``) still works, and v1 is
``--no-mlp --no-aug-plus --no-cos --moco-t 0.07``. The step never waits for the device: loss and
accuracy stay there and are read every ``--print-freq`` iterations.
"""

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sized
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from moco_d2 import io
from moco_d2.cli import setup_logging, teardown_logging
from moco_d2.errors import TrainingDiverged, UserError
from moco_d2.health import HealthMonitor
from moco_d2.launch import Launch, autocast, is_distributed, launch
from moco_d2.pretrain.augment import TwoCropsTransform, moco_augmentation
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.pretrain.data import EpochLoader, TolerantImageFolder, resolve_train_dir
from moco_d2.pretrain.moco import MoCo

logger = logging.getLogger("moco_d2.pretrain")

DIVERGED_ADVICE = "lower --lr or use larger BatchNorm groups (--crop-size, -b, --bn-splits)"


def main(argv: list[str]) -> int:
    config = PretrainConfig.parse(argv)
    if config.launch != "here":  # a submitit job on SLURM, or the local executor
        from moco_d2.pretrain import job

        return job.main(config)
    launch(run, config)
    return 0


def run(config: PretrainConfig, here: Launch) -> None:
    """One process of the run."""
    if here.is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        io.remove_stale_temporaries(config.output_dir)
    handlers = setup_logging(config.output_dir if here.is_main else None, here.is_main)
    try:
        Pretrainer(config, here).train()
    except NothingToDo as e:
        logger.info("%s", e)
    finally:
        teardown_logging(handlers)


class NothingToDo(Exception):
    """The resumed run already trained every epoch: said in one line, exit 0, nothing written."""


class Pretrainer:
    """What one process builds for a run, and its epochs."""

    def __init__(self, flags: PretrainConfig, here: Launch) -> None:
        self.here = here
        self.device = here.device
        state, self.resume_path = load_resume(flags.resume)
        seed = flags.seed if flags.seed is not None else (state or {}).get("seed")
        self.config = config = flags.resolved(here, shared_seed(seed, here))
        if flags.amp and not config.amp:
            logger.warning("--amp: %s has no bf16 support; running in fp32", self.device)
        self.resume_changes = [] if state is None else check_resume(config, state, self.resume_path)
        self.data = build_train_data(config, resolve_train_dir(config.data))
        self.loader = build_train_loader(self.data, config, here)
        io.seed_all(config.run_seed)
        self.model = build_model(config, self.device)
        self.health = HealthMonitor(self.model, self.model.encoder_q.parameters())
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.start_epoch = config.start_epoch
        if state is not None:
            self._restore(state)
        self.train_model: torch.nn.Module = self.model
        if here.distributed:  # one process in total shuffles keys inside it, over the BN groups
            ids = [self.device] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, ids)
        self.writer = None
        if here.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(config.output_dir, "tb"))
        self.knn = None
        if here.is_main and config.knn_data:
            from moco_d2.pretrain.knn import KNNMonitor

            c = config
            self.knn = KNNMonitor(
                config.knn_data, c.crop_size, c.batch, c.workers, c.knn_k, c.knn_t
            )

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(io.strip_module_prefix(state["state_dict"]))
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            from moco_d2.convert.trunk import state_dict_error

            raise UserError(
                f"--resume {self.resume_path}: does not match this model "
                f"(--moco-* / --mlp / -a flags?): {state_dict_error(e)}"
            ) from None
        if int(state["epoch"]) >= self.config.epochs:
            raise NothingToDo(
                f"nothing to do: --resume {self.resume_path} already finished epoch "
                f"{int(state['epoch'])} of --epochs {self.config.epochs} (raise --epochs to "
                "train longer)"
            )
        if "rng" in state:
            io.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        logger.info("resumed from %s at epoch %d", self.resume_path, self.start_epoch)

    def train(self) -> None:
        c = self.config
        logger.info(
            "MoCo %s: %s, %d images, batch %d per process, device %s",
            "v2" if c.mlp and c.aug_plus else "v1-style", c.arch,
            len(cast(Sized, self.data.dataset)), c.batch, self.device,
        )  # fmt: skip
        logger.info(describe_bn(c, self.here))
        logger.info("config: %s", c.to_dict())
        if self.here.is_main:
            io.atomic_write_json(c.to_dict(), os.path.join(c.output_dir, "config.json"))
        try:
            for epoch in range(self.start_epoch, c.epochs):
                self.train_epoch(epoch)
        finally:
            if self.writer is not None:
                self.writer.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the loader, then the kNN monitor, the health check and the checkpoint;
        returns the epoch's mean loss and acc1, img/s, unreadable count and per-step losses."""
        c, writer = self.config, self.writer
        io.seed_all(epoch_seed(c.run_seed, epoch, self.here.rank))
        lr = c.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        batches = self.loader.epoch(epoch)
        iters = len(batches)
        step_loss = torch.zeros(iters, device=self.device)
        step_acc = torch.zeros(iters, device=self.device)
        unreadable = torch.zeros((), dtype=torch.long)
        losses: list[float] = []
        acc1: list[float] = []
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not self.here.is_main, mininterval=0.5)
        start, begin, images = 0, time.perf_counter(), 0
        for i, (batch, _, skipped) in enumerate(bar):
            result = train_step(self.train_model, batch, self.optimizer, self.data, c, self.device)
            unreadable += skipped.sum() + result.unreadable
            step_loss[i], step_acc[i] = result.loss, result.acc1
            images += result.images * self.here.world_size
            if (i + 1) % c.print_freq and i != iters - 1:
                continue
            window = step_loss[start : i + 1]
            if not all_finite(window):
                raise TrainingDiverged(non_finite(window.max().item(), epoch, start, i, lr))
            losses += window.tolist()
            acc1 += step_acc[start : i + 1].tolist()
            start = i + 1
            scalars = self.health.check(f"at epoch {epoch}, iteration {i}", DIVERGED_ADVICE)
            rate = images / (time.perf_counter() - begin)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}")
            if writer is not None:
                step = epoch * iters + i
                scalars.update(loss=losses[-1], acc1=acc1[-1], lr=lr, img_per_s=rate)
                for name, value in scalars.items():
                    writer.add_scalar(f"train/{name}", value, step)
        bar.close()
        count = unreadable.to(self.device).reshape(1)
        if is_distributed():
            dist.all_reduce(count)
        stats = {
            "loss": sum(losses) / len(losses),
            "acc1": sum(acc1) / len(acc1),
            "img_per_s": images / (time.perf_counter() - begin),
            "unreadable": int(count.item()),
            "losses": losses,
        }
        self._end_epoch(epoch, lr, stats)
        return stats

    def _end_epoch(self, epoch: int, lr: float, stats: dict[str, Any]) -> None:
        c = self.config
        logger.info(
            "epoch %d/%d: loss %.4f, acc1 %.2f, lr %.4g, %.1f img/s",
            epoch, c.epochs, stats["loss"], stats["acc1"], lr, stats["img_per_s"],
        )  # fmt: skip
        if stats["unreadable"]:
            logger.warning(
                "epoch %d: %d unreadable images were replaced by the next readable one "
                "(paths above in the log); the epoch kept its %d iterations",
                epoch, stats["unreadable"], self.loader.steps_per_epoch,
            )  # fmt: skip
        if self.knn is not None and ((epoch + 1) % c.knn_every == 0 or epoch + 1 == c.epochs):
            top1 = self.knn.evaluate(self.model.encoder_q, self.device)
            logger.info("epoch %d: kNN top-1 %.2f%%", epoch, top1)
            if self.writer is not None:
                self.writer.add_scalar("knn/top1", top1, epoch)
        where = f"at the end of epoch {epoch}, before saving its checkpoint"
        self.health.check(where, DIVERGED_ADVICE)
        if self.writer is not None:
            self.writer.add_scalar("epoch/loss", stats["loss"], epoch)
            self.writer.add_scalar("epoch/unreadable_images", stats["unreadable"], epoch)
            self.writer.flush()
            state = {
                "epoch": epoch + 1,
                "arch": c.arch,
                "state_dict": io.add_module_prefix(self.model.state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "config": c.to_dict(),
                "seed": c.seed,
                "lr": lr,
                "rng": io.get_rng_state(),
                "resume_changes": self.resume_changes,
            }
            logger.info("saved %s", io.save_checkpoint(state, c.output_dir, epoch))


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
    data: "TrainData",
    config: PretrainConfig,
    device: torch.device,
    check_loss: Callable[[torch.Tensor], None] | None = None,
) -> StepResult:
    """One step on the loader's ``images``: decode (``--decode-on device``), views, forward,
    InfoNCE, backward, SGD. The host never waits for the device in it, except inside
    ``decode_jpeg`` and in ``check_loss`` (the released per-step ``.item()``, called between
    forward and backward)."""
    unreadable = 0
    if data.decode is not None:
        images, unreadable = data.decode(images, device)
    im_q, im_k = views_to_device(images, device, data.augment, config.channels_last)
    with autocast(device, config.amp):
        logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits.float(), labels)
    if check_loss is not None:
        check_loss(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    acc1 = (logits.detach().argmax(dim=1) == labels).float().mean() * 100
    return StepResult(loss.detach(), acc1, im_q.shape[0], unreadable)


def views_to_device(
    images: Any,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels_last: bool | None = False,
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


def all_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` are finite on every process (one host sync)."""
    finite = torch.isfinite(values.detach()).all().to(torch.int32).reshape(1)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def non_finite(value: float, epoch: int, first: int, last: int, lr: float) -> str:
    where = f"iteration {first}" if first == last else f"iterations {first}-{last}"
    return (
        f"non-finite loss ({value}) at epoch {epoch}, {where}, lr {lr:.4g}: lower --lr, check "
        "the data, or try without --amp; the last checkpoint is intact"
    )


# The run's parts, built from the config by the tool, the benchmarks and the tests alike.


@dataclasses.dataclass
class TrainData:
    """What the loader serves and how a collated batch becomes the two views on the device.

    ``dataset`` items are ``(images, target, unreadable)``; ``collate_fn`` None is the
    DataLoader's default; ``augment`` is the device-side step from the batch's images to views
    (None: the workers already made the normalised views); ``decode`` turns a batch of encoded
    JPEGs into uint8 crops on the device first (``--decode-on device``; None otherwise).
    """

    dataset: Dataset
    collate_fn: Callable | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    decode: Callable[[Any, torch.device], tuple[torch.Tensor, int]] | None = None


def build_train_data(config: PretrainConfig, train_dir: str) -> TrainData:
    """The training images of ``train_dir`` as ``--augment-on`` and ``--decode-on`` want them
    (the device modules are imported only when chosen)."""
    if config.augment_on == "device":
        from moco_d2.pretrain.device_augment import DeviceAugment
        from moco_d2.pretrain.device_decode import decode_setup

        d = decode_setup(config.decode_on or "loader", config.crop_size, train_dir)
        return TrainData(d.dataset, d.collate_fn, DeviceAugment(config.aug_plus), d.decode)
    transform = TwoCropsTransform(moco_augmentation(config.aug_plus, config.crop_size))
    return TrainData(TolerantImageFolder(train_dir, transform))


def build_train_loader(
    data: TrainData, config: PretrainConfig, here: Launch, across_epochs: bool = True
) -> EpochLoader:
    """This process's shard of ``data``, ``config.batch`` images a step, reshuffled every epoch
    from the run's seed (the same on every rank); see :class:`EpochLoader` for
    ``across_epochs``."""
    size = len(cast(Sized, data.dataset))
    if size < config.global_batch:
        root = getattr(data.dataset, "root", config.data)
        raise UserError(
            f"{root} has {size} images, fewer than one global batch of {config.global_batch}"
        )
    sampler: DistributedSampler = DistributedSampler(
        data.dataset, here.world_size, here.rank, shuffle=True, seed=config.run_seed
    )
    return EpochLoader(
        data.dataset, sampler, config.batch, config.run_seed, config.epochs, config.workers,
        pin_memory=here.device.type == "cuda", collate_fn=data.collate_fn,
        across_epochs=across_epochs,
    )  # fmt: skip


def build_model(
    config: PretrainConfig, device: torch.device, foreach_momentum: bool = True
) -> MoCo:
    """The MoCo model on ``device`` in the ``--channels-last`` format, ``--compile``-d;
    ``foreach_momentum`` False is the released per-parameter momentum loop."""
    import torchvision

    model = MoCo(
        torchvision.models.get_model_builder(config.arch),
        config.moco_dim, config.moco_k, config.moco_m, config.moco_t, config.mlp,
        bn_splits=config.bn_splits or 1, foreach_momentum=foreach_momentum,
    ).to(device)  # fmt: skip
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile:
        # The encoders only (state_dict keys unchanged): compiled whole, the queue's defensive
        # clone could be dropped before its update.
        model.encoder_q.compile()
        model.encoder_k.compile()
    return model


def build_optimizer(
    model: MoCo, config: PretrainConfig, device: torch.device, kernel: dict | None = None
) -> torch.optim.SGD:
    """SGD over the query encoder: fused on CUDA (one kernel for all parameters), foreach
    elsewhere; ``kernel`` ``{"foreach": False}`` is the released per-parameter update."""
    default = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        **(default if kernel is None else kernel),
    )


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Independent seed for (run seed, epoch, rank) of the training process (key shuffle,
    device augmentation); with the items' own seeds (:mod:`moco_d2.pretrain.data`) each epoch
    depends only on these, which is what makes resuming exact."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def shared_seed(seed: int | None, here: Launch) -> int:
    """``seed``, or one drawn at random; rank 0's on every rank (the sampler needs one seed)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if here.distributed:
        shared = torch.tensor([seed], dtype=torch.int64, device=here.device)
        dist.broadcast(shared, src=0)
        seed = int(shared.item())
    return seed


def describe_bn(config: PretrainConfig, here: Launch) -> str:
    """How this run gets shuffle-BN, in words."""
    if here.distributed:
        return (
            f"{here.world_size} processes: keys shuffled across processes (DDP), "
            f"{config.bn_splits} BatchNorm group(s) per process"
        )
    if config.bn_splits == 1:
        return (
            "one process in total: no process group or DDP; plain BatchNorm over the batch "
            "(--bn-splits 1), so no shuffle-BN effect"
        )
    return (
        "one process in total: no process group or DDP; shuffle-BN emulated with "
        f"{config.bn_splits} BatchNorm groups (--bn-splits)"
    )


def load_resume(path: str) -> tuple[dict[str, Any] | None, str]:
    """The ``--resume`` checkpoint (a folder: its latest) and its path; ``(None, "")`` without."""
    if not path:
        return None, ""
    if os.path.isdir(path):
        found = io.latest_checkpoint(path)
        if found is None:
            raise UserError(f"--resume {path}: no checkpoint_*.pth.tar in that folder")
        path = found
    state = io.load_checkpoint(path)
    missing = [k for k in ("epoch", "arch", "state_dict", "optimizer") if k not in state]
    if missing:
        raise UserError(
            f"--resume {path}: not a MoCo pretraining checkpoint (no {', '.join(missing)})"
        )
    return state, path


def check_resume(config: PretrainConfig, state: dict[str, Any], path: str) -> list[dict]:
    """Refuse a resume whose FIXED settings differ from the checkpoint's config; return the
    run's ``resume_changes``: the checkpoint's, plus this resume's FREE changes (logged).

    A checkpoint of the released main_moco.py records only its arch, which is compared; one of
    an earlier version of this tool (its settings under ``moco``/``train``) is refused."""
    saved = state.get("config")
    if saved is None and "moco" in state:
        raise UserError(
            f"--resume {path}: written by an earlier version of this tool, whose settings "
            "record this version does not read; finish that run with the version that started "
            "it, or start a new --output-dir"
        )
    refused, allowed = config.diff(saved if saved is not None else {"arch": state["arch"]})
    if refused:
        raise UserError(
            f"--resume {path}: the run was started with other settings: {', '.join(refused)}; "
            "resume with the checkpoint's flags (its run's config.json), or start a new "
            "--output-dir"
        )
    history = list(state.get("resume_changes", []))
    if allowed:
        logger.warning(
            "resumed with changed settings that keep what is trained but not bit-exactness: %s",
            ", ".join(allowed),
        )
        history.append({"epoch": int(state["epoch"]), "changes": allowed})
    return history
