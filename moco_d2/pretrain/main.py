"""`tools/pretrain_moco.py`: MoCo v1/v2 pretraining with the released main_moco.py flags.

Defaults are MoCo v2 (MLP head, aug+, cosine schedule, T=0.2); the released v2 command line
(``--mlp --aug-plus --cos --moco-t 0.2``) still works, and v1 is
``--no-mlp --no-aug-plus --no-cos --moco-t 0.07``.
"""

import argparse
import json
import logging
import os
import sys

import torch
import torchvision

from moco_d2.cli import ArgumentParser
from moco_d2.convert.trunk import state_dict_error
from moco_d2.errors import UserError
from moco_d2.io import remove_stale_temporaries
from moco_d2.pretrain.data import resolve_train_dir
from moco_d2.pretrain.engine import train_one_epoch
from moco_d2.pretrain.health import HealthMonitor
from moco_d2.pretrain.resume import (
    NothingToDo,
    check_epochs,
    check_resume,
    check_unfinished,
    recorded_settings,
)
from moco_d2.pretrain.setup import (
    bn_splits_for,
    build_model,
    build_optimizer,
    build_train_data,
    build_train_loader,
    describe_bn,
    epoch_seed,
    wrap_for_training,
)
from moco_d2.pretrain.speed_flags import (
    add_speed_arguments,
    check_speed_arguments,
    resolve_speed_arguments,
)
from moco_d2.training import checkpoint as ckpt
from moco_d2.training.cli_args import (
    add_training_arguments,
    non_negative_float,
    per_process_batch,
    positive_float,
    positive_int,
)
from moco_d2.training.distributed import (
    add_distributed_arguments,
    cleanup,
    init_process,
    launch,
    procs_per_node,
)
from moco_d2.training.logs import setup_logging, teardown_logging
from moco_d2.training.schedule import adjust_learning_rate

logger = logging.getLogger("moco_d2.pretrain")

EPILOG = """\
shuffling BN: with several processes (torchrun or --multiprocessing-distributed) the keys are
shuffled across processes as in the released code. With one process in total (however launched,
including the released one-GPU --multiprocessing-distributed --world-size 1 --rank 0) there is no
process group and no DDP: BatchNorm is split into --bn-splits groups of the batch
(SplitBatchNorm) and the keys are shuffled inside the process, which emulates that many GPUs.
The default picks the largest number of groups <= 8 that divides the batch with at least 2
images and 16 values per channel in the last stage per group; --bn-splits 1 turns the emulation
off. Smaller groups are refused.

-b is the batch of one node, split evenly over its processes, and -j the data-loading workers of
each process, as in the released code; --lr is for that batch: scale it linearly (0.03 per 256
images).
"""


def model_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="pretrain_moco.py",
        description="MoCo v2 (default) / v1 pretraining on an image folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "data", metavar="DIR", help="dataset root: DIR/train (ImageNet layout) or DIR itself"
    )
    add_training_arguments(
        p,
        arch_choices=model_names(),
        epochs=200,
        lr=0.03,
        lr_help="initial learning rate for -b (default: 0.03, for 256 images)",
        schedule=(120, 160),
        weight_decay=1e-4,
        print_freq_help="TensorBoard scalars every N iterations (default: 10)",
        resume_help="checkpoint to resume from, or a folder (its latest checkpoint)",
        seed_help="seed for exact, resumable runs (default: drawn at random and logged)",
    )
    add_distributed_arguments(p)
    moco = p.add_argument_group("moco")
    moco.add_argument(
        "--moco-dim", default=128, type=positive_int, help="feature dimension (default: 128)"
    )
    moco.add_argument(
        "--moco-k", default=65536, type=positive_int, help="queue size (default: 65536)"
    )
    moco.add_argument(
        "--moco-m",
        default=0.999,
        type=non_negative_float,
        help="key encoder momentum (default: 0.999)",
    )
    moco.add_argument(
        "--moco-t", default=0.2, type=positive_float, help="softmax temperature (v2 0.2, v1 0.07)"
    )
    moco.add_argument(
        "--mlp", default=True, action=argparse.BooleanOptionalAction, help="MLP head (v2)"
    )
    moco.add_argument(
        "--aug-plus",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="v2 augmentation with blur",
    )
    moco.add_argument(
        "--cos", default=True, action=argparse.BooleanOptionalAction, help="cosine lr schedule"
    )
    extra = p.add_argument_group("this tool")
    extra.add_argument(
        "--output-dir",
        default="output/moco_pretrain",
        help="checkpoints, log.txt and TensorBoard events (tb/)",
    )
    extra.add_argument(
        "--bn-splits",
        default=None,
        type=positive_int,
        help="SplitBatchNorm groups per process (default: 8-ish with one process, "
        "1 when distributed; see below)",
    )
    extra.add_argument(
        "--crop-size", default=224, type=positive_int, help="training crop (default: 224)"
    )
    extra.add_argument("--amp", action="store_true", help="bf16 autocast where supported")
    extra.add_argument(
        "--knn-data",
        default=None,
        metavar="DIR",
        help="kNN monitor on DIR/train (bank) and DIR/val (queries), labelled folders",
    )
    extra.add_argument(
        "--knn-every", default=5, type=positive_int, metavar="N", help="kNN monitor every N epochs"
    )
    extra.add_argument("--knn-k", default=200, type=positive_int)
    extra.add_argument("--knn-t", default=0.1, type=positive_float)
    add_speed_arguments(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags checked by their types; the data folder checked here, before any process starts."""
    args = build_parser().parse_args(argv)
    resolve_train_dir(args.data)
    check_speed_arguments(args)
    check_epochs(args)
    per_process_batch(args.batch_size, max(procs_per_node(args), 1))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launch(main_worker, args)
    return 0


def main_worker(local_rank: int, args: argparse.Namespace) -> None:
    device = init_process(local_rank, args)
    is_main = args.rank == 0
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_stale_temporaries(args.output_dir)
    handlers = setup_logging(args.output_dir if is_main else None, is_main)
    try:
        Pretrainer(args, device).run()
    except NothingToDo as e:
        logger.info("%s", e)
    finally:
        teardown_logging(handlers)
        cleanup()


class Pretrainer:
    """Everything one process needs for a run: data, model, optimizer, logs, checkpoints."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        resolve_speed_arguments(args, device)
        self.args = args
        self.device = device
        self.rank = args.rank
        self.world = args.world_size
        self.is_main = self.rank == 0
        self.resume_state = self._load_resume()
        self.seed = self._resolve_seed()

        self.batch = per_process_batch(args.batch_size, procs_per_node(args))
        self.global_batch = self.batch * self.world
        if args.moco_k % self.global_batch:
            raise UserError(
                f"--moco-k {args.moco_k} must be a multiple of the global batch {self.global_batch}"
            )
        self.bn_splits = bn_splits_for(args, self.batch)
        self.settings = recorded_settings(args, self.bn_splits, self.batch, self.global_batch)
        self.settings.update(arch=args.arch, seed=self.seed)
        self.resume_changes = []
        if self.resume_state is not None:
            self.resume_changes = check_resume(self.resume_state, self.resume_path, self.settings)

        self.data = build_train_data(args, resolve_train_dir(args.data))
        self.loader = build_train_loader(self.data, args, self.batch, self.seed, device)

        ckpt.seed_all(self.seed)
        self.model = build_model(args, device, self.bn_splits)
        self.health = HealthMonitor(self.model, self.model.encoder_q)
        self.optimizer = build_optimizer(self.model, args, device)
        self.start_epoch = args.start_epoch
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self.train_model = wrap_for_training(self.model, args, device)
        self.writer = self._tensorboard() if self.is_main else None
        self.knn = self._knn_monitor() if self.is_main and args.knn_data else None

    def _load_resume(self):
        path = self.args.resume
        if not path:
            return None
        if os.path.isdir(path):
            found = ckpt.latest_checkpoint(path)
            if found is None:
                raise UserError(f"--resume {path}: no checkpoint_*.pth.tar in that folder")
            path = found
        state = ckpt.load_checkpoint(path)
        missing = [k for k in ("epoch", "arch", "state_dict", "optimizer") if k not in state]
        if missing:
            raise UserError(
                f"--resume {path}: not a MoCo pretraining checkpoint (no {', '.join(missing)})"
            )
        self.resume_path = path
        return state

    def _resolve_seed(self):
        seed = self.args.seed
        if seed is None and self.resume_state is not None:
            seed = self.resume_state.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        if self.args.distributed:  # the sampler needs one seed on every rank
            shared = torch.tensor([seed], dtype=torch.int64, device=self.device)
            torch.distributed.broadcast(shared, src=0)
            seed = int(shared.item())
        return seed

    def _restore(self, state):
        try:
            self.model.load_state_dict(ckpt.strip_module_prefix(state["state_dict"]))
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"--resume {self.resume_path}: does not match this model "
                f"(--moco-* / --mlp / -a flags?): {state_dict_error(e)}"
            ) from None
        check_unfinished(state, self.resume_path, self.args.epochs)
        if "rng" in state:
            ckpt.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        logger.info("resumed from %s at epoch %d", self.resume_path, self.start_epoch)

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(os.path.join(self.args.output_dir, "tb"))

    def _knn_monitor(self):
        from moco_d2.pretrain.knn import KNNMonitor

        a = self.args
        return KNNMonitor(
            a.knn_data, a.crop_size, batch_size=self.batch, workers=a.workers, k=a.knn_k, t=a.knn_t
        )

    def checkpoint_state(self, epoch: int, lr: float) -> dict:
        return {
            **self.settings,
            "epoch": epoch + 1,
            "state_dict": ckpt.add_module_prefix(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "lr": lr,
            "rng": ckpt.get_rng_state(),
            "resume_changes": self.resume_changes,
        }

    def run(self) -> None:
        a = self.args
        logger.info(
            "MoCo %s: arch %s, %d images, batch %d per process x %d processes, bn-splits %d, "
            "K %d, m %g, T %g, mlp %s, aug+ %s, cos %s, lr %g, seed %d, device %s, augment on %s, "
            "decode on %s, channels-last %s, compile %s",
            "v2" if a.mlp and a.aug_plus else "v1-style",
            a.arch,
            len(self.data.dataset),
            self.batch,
            self.world,
            self.bn_splits,
            a.moco_k,
            a.moco_m,
            a.moco_t,
            a.mlp,
            a.aug_plus,
            a.cos,
            a.lr,
            self.seed,
            self.device,
            a.augment_on,
            a.decode_on,
            a.channels_last,
            a.compile,
        )
        logger.info(describe_bn(a, self.bn_splits))
        if self.is_main:
            config = {
                k: v
                for k, v in vars(a).items()
                if isinstance(v, (int, float, str, bool, list, type(None)))
            }
            with open(os.path.join(a.output_dir, "args.json"), "w") as f:
                json.dump(dict(config, seed=self.seed, bn_splits=self.bn_splits), f, indent=2)
        try:
            self._train(a)
        finally:
            if self.writer is not None:
                self.writer.close()

    def _train(self, a):
        for epoch in range(self.start_epoch, a.epochs):
            ckpt.seed_all(epoch_seed(self.seed, epoch, self.rank))
            lr = adjust_learning_rate(self.optimizer, epoch, a)
            stats = train_one_epoch(
                self.train_model,
                self.loader.epoch(epoch),
                self.optimizer,
                epoch,
                self.device,
                lr,
                amp=a.amp,
                writer=self.writer,
                print_freq=a.print_freq,
                show_progress=self.is_main,
                augment=self.data.augment,
                channels_last=a.channels_last,
                health=self.health,
                decode=self.data.decode,
            )
            logger.info(
                "epoch %d/%d: loss %.4f, acc1 %.2f, lr %.4g, %.1f img/s",
                epoch,
                a.epochs,
                stats["loss"],
                stats["acc1"],
                lr,
                stats["img_per_s"],
            )
            if stats["unreadable"]:
                logger.warning(
                    "epoch %d: %d unreadable images were replaced by the next readable one "
                    "(paths above in the log); the epoch kept its %d iterations",
                    epoch,
                    stats["unreadable"],
                    self.loader.steps_per_epoch,
                )
            if self.knn is not None and ((epoch + 1) % a.knn_every == 0 or epoch + 1 == a.epochs):
                top1 = self.knn.evaluate(self.model.encoder_q, self.device)
                logger.info("epoch %d: kNN top-1 %.2f%%", epoch, top1)
                self.writer.add_scalar("knn/top1", top1, epoch)
            self.health.check(f"at the end of epoch {epoch}, before saving its checkpoint")
            if self.is_main:
                self.writer.add_scalar("epoch/loss", stats["loss"], epoch)
                self.writer.add_scalar("epoch/unreadable_images", stats["unreadable"], epoch)
                self.writer.flush()
                path = ckpt.save_checkpoint(self.checkpoint_state(epoch, lr), a.output_dir, epoch)
                logger.info("saved %s", path)
