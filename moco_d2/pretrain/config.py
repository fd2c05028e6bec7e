"""The settings of a pretraining run: the released main_moco.py flags (defaults MoCo v2) plus this
tool's, in one frozen :class:`PretrainConfig` that every part of the run reads."""

import argparse
import dataclasses
import math
from typing import TYPE_CHECKING

import torchvision

from moco_d2.cli import ArgumentParser, non_negative_float, positive_float, positive_int
from moco_d2.config import FIXED, FREE, ClusterFlags, TrainConfig, derived, flag, per_process_batch
from moco_d2.errors import UserError

if TYPE_CHECKING:
    from moco_d2.launch import Launch

DEFAULT_BN_SPLITS = 8

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


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainConfig, ClusterFlags):
    arch: str = flag(
        "-a", "--arch", default="resnet50", metavar="ARCH", resume=FIXED,
        choices=sorted(torchvision.models.list_models(module=torchvision.models)),
        help="torchvision model (default: resnet50)",
    )  # fmt: skip
    data: str = flag(
        "data", default="", metavar="DIR",
        help="dataset root: DIR/train (ImageNet layout) or DIR itself",
    )  # fmt: skip
    moco_dim: int = flag(
        "--moco-dim", default=128, type=positive_int, resume=FIXED, group="moco",
        help="feature dimension (default: 128)",
    )  # fmt: skip
    moco_k: int = flag(
        "--moco-k", default=65536, type=positive_int, resume=FIXED, group="moco",
        help="queue size (default: 65536)",
    )  # fmt: skip
    moco_m: float = flag(
        "--moco-m", default=0.999, type=non_negative_float, resume=FIXED, group="moco",
        help="key encoder momentum (default: 0.999)",
    )  # fmt: skip
    moco_t: float = flag(
        "--moco-t", default=0.2, type=positive_float, resume=FIXED, group="moco",
        help="softmax temperature (v2 0.2, v1 0.07)",
    )  # fmt: skip
    mlp: bool = flag(
        "--mlp", default=True, action=argparse.BooleanOptionalAction, resume=FIXED,
        group="moco", help="MLP head (v2)",
    )  # fmt: skip
    aug_plus: bool = flag(
        "--aug-plus", default=True, action=argparse.BooleanOptionalAction, resume=FIXED,
        group="moco", help="v2 augmentation with blur",
    )  # fmt: skip
    cos: bool = flag(
        "--cos", default=True, action=argparse.BooleanOptionalAction, resume=FIXED,
        group="moco", help="cosine lr schedule",
    )  # fmt: skip
    output_dir: str = flag(
        "--output-dir", default="output/moco_pretrain", group="this tool",
        help="checkpoints, config.json, log.txt and TensorBoard events (tb/)",
    )  # fmt: skip
    bn_splits: int | None = flag(
        "--bn-splits", default=None, type=positive_int, group="this tool",
        help="SplitBatchNorm groups per process (default: 8-ish with one process, 1 when "
        "distributed; see below)",
    )  # fmt: skip
    knn_data: str | None = flag(
        "--knn-data", default=None, metavar="DIR", group="this tool",
        help="kNN monitor on DIR/train (bank) and DIR/val (queries), labelled folders",
    )  # fmt: skip
    knn_every: int = flag(
        "--knn-every", default=5, type=positive_int, metavar="N", group="this tool",
        help="kNN monitor every N epochs",
    )  # fmt: skip
    knn_k: int = flag("--knn-k", default=200, type=positive_int, group="this tool", help="kNN k")
    knn_t: float = flag(
        "--knn-t", default=0.1, type=positive_float, group="this tool", help="kNN temperature"
    )
    augment_on: str | None = flag(
        "--augment-on", default=None, choices=["loader", "device"], resume=FREE, group="speed",
        help="where the views are augmented: 'loader' (PIL in the DataLoader workers) or "
        "'device' (workers only decode and crop; color jitter, grayscale, blur, flip and "
        "normalize run batched on the training device). Default: device on CUDA or with "
        "--decode-on device, else loader",
    )  # fmt: skip
    decode_on: str | None = flag(
        "--decode-on", default=None, choices=["loader", "device"], resume=FREE, group="speed",
        help="where JPEGs are decoded with --augment-on device: 'loader' (PIL in the workers) "
        "or 'device' (workers only read the file and draw the crop boxes; the batch is decoded "
        "with torchvision.io.decode_jpeg on the training device, nvJPEG on CUDA). 'device' "
        "implies --augment-on device. Default: device on CUDA with --augment-on device, else "
        "loader",
    )  # fmt: skip
    channels_last: bool | None = flag(
        "--channels-last", default=None, action=argparse.BooleanOptionalAction, resume=FREE,
        group="speed", help="channels-last memory format for the encoders (default: on for CUDA)",
    )  # fmt: skip
    compile: bool = flag(
        "--compile", default=False, action="store_true", resume=FREE, group="speed",
        help="torch.compile the query and key encoders (off by default)",
    )  # fmt: skip
    # Filled by resolved(): what the launch makes of -b and --bn-splits.
    batch: int = derived()
    global_batch: int = derived(FIXED, "global batch (-b x nodes)")
    bn_group: int = derived(FIXED, "images per BatchNorm group (-b / --bn-splits / processes)")

    @classmethod
    def parse(cls, argv: list[str]) -> "PretrainConfig":
        """The flags, checked before any process starts (the data folder too)."""
        parser = ArgumentParser(
            prog="pretrain_moco.py",
            description="MoCo v2 (default) / v1 pretraining on an image folder.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cls.add_arguments(parser)
        config = cls.from_args(parser.parse_args(argv))
        from moco_d2.launch import procs_per_node
        from moco_d2.pretrain.data import resolve_train_dir

        resolve_train_dir(config.data)
        if config.decode_on == "device" and config.augment_on == "loader":
            raise UserError(
                "--decode-on device needs --augment-on device (the loader path augments PIL "
                "images in the workers)"
            )
        if config.start_epoch >= config.epochs:
            raise UserError(
                f"--start-epoch {config.start_epoch} is not below --epochs {config.epochs}: "
                "nothing would be trained"
            )
        per_process_batch(config.batch_size, max(procs_per_node(config), 1))
        return config

    def resolved(self, launch: "Launch", seed: int) -> "PretrainConfig":
        """The config of this run: device-dependent defaults, the seed, the batch per process and
        the BatchNorm groups, from the launch."""
        from moco_d2.launch import bf16_supported
        from moco_d2.pretrain.split_bn import resolve_bn_splits

        cuda = launch.device.type == "cuda"
        augment_on = self.augment_on or (
            "device" if cuda or self.decode_on == "device" else "loader"
        )
        batch = per_process_batch(self.batch_size, launch.procs_per_node)
        global_batch = batch * launch.world_size
        if self.moco_k % global_batch:
            raise UserError(
                f"--moco-k {self.moco_k} must be a multiple of the global batch {global_batch}"
            )
        splits = resolve_bn_splits(self, batch, launch.distributed)
        return dataclasses.replace(
            self,
            seed=seed,
            amp=self.amp and bf16_supported(launch.device),
            augment_on=augment_on,
            decode_on=self.decode_on or ("device" if cuda and augment_on == "device" else "loader"),
            channels_last=cuda if self.channels_last is None else self.channels_last,
            bn_splits=splits,
            batch=batch,
            global_batch=global_batch,
            bn_group=batch // splits,
        )

    @property
    def run_seed(self) -> int:
        """The seed of a resolved config (resolved() draws one where --seed was not given)."""
        assert self.seed is not None, "resolved() sets the seed"
        return self.seed

    def lr_at(self, epoch: int) -> float:
        """MoCo v2's cosine schedule with ``--cos``, else the released steps."""
        if self.cos:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return super().lr_at(epoch)

    def unused_on_resume(self) -> set[str]:
        return {"schedule"} if self.cos else set()
