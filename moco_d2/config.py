"""Run settings as one frozen dataclass per tool, built once from the flags and the launch.

Each field is a flag (or a value derived once the launch is known) and says in one place
whether a resume may change it: ``FIXED`` fields define what is trained, so a resume that
changes one is refused; ``FREE`` ones keep what is trained but not bit-exactness, so a change is
allowed, logged and recorded; the rest (workers, logging, paths, launch) change freely. The
parser is generated from the fields, and the config is saved as plain data (``config.json`` and
each checkpoint's ``config``), so a resume check is the difference of two configs.
"""

import argparse
import dataclasses
import os
from typing import Any, TypeVar

from moco_d2.cli import non_negative_float, non_negative_int, positive_float, positive_int
from moco_d2.errors import UserError

FIXED = "fixed"
FREE = "free"
DEFAULT_WORKERS = min(32, os.cpu_count() or 1)  # the released 32, or fewer on a small machine
# torch's and Detectron2's own default. It bounds every collective too, and ranks wait in one
# while rank 0 alone runs the kNN monitor or writes a checkpoint, so it must outlast those.
DEFAULT_DIST_TIMEOUT_S = 1800.0


def flag(*names: str, default: Any, help: str, resume: str | None = None, **kw: Any) -> Any:
    """A field set by the flag ``names`` (argparse keywords in ``kw``; ``group`` names the help
    section)."""
    meta = {"names": names, "help": help, "resume": resume, "group": kw.pop("group", None), **kw}
    return dataclasses.field(default=default, metadata={"flag": meta})


def derived(resume: str | None = None, shown: str = "") -> Any:
    """A field filled by ``resolved()`` from the flags and the launch; ``shown`` names the flags
    it comes from, in messages."""
    return dataclasses.field(default=None, metadata={"resume": resume, "shown": shown})


F = TypeVar("F", bound="Flags")


@dataclasses.dataclass(frozen=True)
class Flags:
    """A frozen set of settings whose fields are flags (:func:`flag`)."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        groups: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if "flag" not in f.metadata:
                continue
            meta = dict(f.metadata["flag"])
            names, group = meta.pop("names"), meta.pop("group")
            meta.pop("resume")
            target = groups.setdefault(group, parser.add_argument_group(group)) if group else parser
            if names[0].startswith("-"):
                meta["dest"] = f.name
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            target.add_argument(*names, default=default, **meta)

    @classmethod
    def from_args(cls: type[F], args: argparse.Namespace) -> F:
        values = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if "flag" in f.metadata
        }
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON, and ``torch.load(weights_only=True)`` of a checkpoint)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}


@dataclasses.dataclass(frozen=True)
class ClusterFlags(Flags):
    """Where the jobs run (:mod:`moco_d2.cluster`): here, on SLURM or through submitit's local
    executor, and the SLURM job's shape and parameters."""

    launch: str = flag(
        "--launch", default="here", choices=["here", "slurm", "local"], group="cluster",
        help="here: in this process (default); slurm: as SLURM jobs through submitit; local: "
        "the same jobs through submitit's local executor on this machine",
    )  # fmt: skip
    partition: str | None = flag("--partition", default=None, group="cluster", help="partition")
    nodes: int = flag(
        "--nodes", default=1, type=positive_int, group="cluster", help="nodes of one job"
    )
    gpus_per_node: int | None = flag(
        "--gpus-per-node", default=None, type=non_negative_int, group="cluster",
        help="GPUs per node of one job (default: 8 on slurm, 0 with --launch local)",
    )  # fmt: skip
    timeout_min: int = flag(
        "--timeout-min", default=72 * 60, type=positive_int, group="cluster",
        help="a job's time limit in minutes (default: %(default)s); at the limit it is "
        "checkpointed and requeued",
    )  # fmt: skip
    account: str | None = flag("--account", default=None, group="cluster", help="SLURM account")
    constraint: str | None = flag(
        "--constraint", default=None, group="cluster", help="SLURM constraint"
    )
    slurm_param: tuple[str, ...] = flag(
        "--slurm-param", default=(), action="append", metavar="KEY=VALUE", group="cluster",
        help="any other sbatch parameter, e.g. qos=high (repeatable)",
    )  # fmt: skip
    job_dir: str | None = flag(
        "--job-dir", default=None, group="cluster",
        help="submitit's folder of job scripts and logs (default: OUTPUT/jobs)",
    )  # fmt: skip

    @property
    def gpus(self) -> int:
        """GPUs per node of a job: --gpus-per-node, else 8 on SLURM and none locally."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return 8 if self.launch == "slurm" else 0

    @property
    def tasks_per_node(self) -> int:
        """One task (one rank) per GPU, or per --nproc-per-node CPU process without GPUs."""
        return self.gpus or getattr(self, "nproc_per_node", None) or 1


@dataclasses.dataclass(frozen=True)
class TrainConfig(Flags):
    """The flags of the released main_moco.py / main_lincls.py that both tools share: ``-b`` is
    one node's batch, split evenly over its processes, and ``-j`` each process's workers."""

    data: str = flag("data", default="", metavar="DIR", help="dataset root")
    arch: str = flag(
        "-a", "--arch", default="resnet50", metavar="ARCH", resume=FIXED,
        help="torchvision model (default: resnet50)",
    )  # fmt: skip
    workers: int = flag(
        "-j", "--workers", default=DEFAULT_WORKERS, type=non_negative_int, metavar="N",
        help="data-loading workers per process (default: min(32, CPU cores))",
    )  # fmt: skip
    epochs: int = flag(
        "--epochs", default=200, type=positive_int, metavar="N", resume=FREE,
        help="total epochs (default: %(default)s)",
    )  # fmt: skip
    start_epoch: int = flag(
        "--start-epoch", default=0, type=non_negative_int, metavar="N",
        help="first epoch (taken from the checkpoint with --resume)",
    )  # fmt: skip
    batch_size: int = flag(
        "-b", "--batch-size", default=256, type=positive_int, metavar="N",
        help="batch of one node, split evenly over its processes (default: %(default)s)",
    )  # fmt: skip
    lr: float = flag(
        "--lr", "--learning-rate", default=0.03, type=positive_float, metavar="LR", resume=FIXED,
        help="initial learning rate for -b (default: %(default)s)",
    )  # fmt: skip
    schedule: tuple[int, ...] = flag(
        "--schedule", default=(120, 160), nargs="*", type=non_negative_int, metavar="EPOCH",
        resume=FIXED, help="epochs at which the lr is multiplied by 0.1 (default: %(default)s)",
    )  # fmt: skip
    momentum: float = flag(
        "--momentum", default=0.9, type=non_negative_float, metavar="M", resume=FIXED,
        help="SGD momentum",
    )  # fmt: skip
    weight_decay: float = flag(
        "--wd", "--weight-decay", default=1e-4, type=non_negative_float, metavar="W",
        resume=FIXED, help="weight decay (default: %(default)s)",
    )  # fmt: skip
    print_freq: int = flag(
        "-p", "--print-freq", default=10, type=positive_int, metavar="N",
        help="log every N iterations (default: 10)",
    )  # fmt: skip
    resume: str = flag(
        "--resume", default="", metavar="PATH",
        help="checkpoint to resume from, or a folder (its latest checkpoint)",
    )  # fmt: skip
    seed: int | None = flag(
        "--seed", default=None, type=non_negative_int, resume=FREE,
        help="seed for exact, resumable runs (default: drawn at random and logged)",
    )  # fmt: skip
    output_dir: str = flag("--output-dir", default="output", help="checkpoints and logs")
    amp: bool = flag(
        "--amp", default=False, action="store_true", resume=FREE,
        help="bf16 autocast where the device supports it",
    )  # fmt: skip
    crop_size: int = flag(
        "--crop-size", default=224, type=positive_int, metavar="PX", resume=FIXED,
        help="training crop (default: 224)",
    )  # fmt: skip
    # the released launch flags, plus --device and --nproc-per-node
    world_size: int = flag(
        "--world-size", default=-1, type=int, group="distributed",
        help="number of nodes with --multiprocessing-distributed, else number of processes "
        "(default: from torchrun, or 1)",
    )  # fmt: skip
    rank: int = flag(
        "--rank", default=-1, type=int, group="distributed",
        help="node rank with --multiprocessing-distributed, else process rank",
    )  # fmt: skip
    dist_url: str = flag(
        "--dist-url", default="env://", group="distributed",
        help="init method, e.g. tcp://HOST:PORT (default env://, as torchrun sets)",
    )  # fmt: skip
    dist_backend: str | None = flag(
        "--dist-backend", default=None, choices=["nccl", "gloo"], group="distributed",
        help="default: nccl on GPU, gloo on CPU",
    )  # fmt: skip
    dist_timeout: float = flag(
        "--dist-timeout", default=DEFAULT_DIST_TIMEOUT_S, type=positive_float,
        metavar="SECONDS", group="distributed",
        help="stop when the process group has not formed after this long; also the limit of "
        "every collective (default: %(default)g)",
    )  # fmt: skip
    multiprocessing_distributed: bool = flag(
        "--multiprocessing-distributed", default=False, action="store_true", group="distributed",
        help="spawn one process per GPU on this node (the released 8-GPU launch)",
    )  # fmt: skip
    nproc_per_node: int | None = flag(
        "--nproc-per-node", default=None, type=positive_int, group="distributed",
        help="processes spawned by --multiprocessing-distributed (default: number of GPUs, "
        "1 on CPU)",
    )  # fmt: skip
    device: str = flag(
        "--device", default="auto", group="distributed",
        help="auto (GPU when available), cpu, cuda or cuda:N",
    )  # fmt: skip

    def lr_at(self, epoch: int) -> float:
        """The released step schedule: the lr times 0.1 at each ``--schedule`` epoch reached."""
        return self.lr * 0.1 ** sum(epoch >= m for m in self.schedule)

    def unused_on_resume(self) -> set[str]:
        """Fields this run does not read, left out of the resume comparison."""
        return set()

    def diff(self, saved: dict[str, Any]) -> tuple[list[str], list[str]]:
        """``(refused, allowed)``: the FIXED and FREE fields whose value differs from the saved
        config's, each as ``--flag now (checkpoint: then)``. Fields the saved config lacks (an
        older version) are not compared."""
        refused: list[str] = []
        allowed: list[str] = []
        for f in dataclasses.fields(self):
            meta = f.metadata.get("flag", f.metadata)
            if meta.get("resume") is None or f.name not in saved:
                continue
            now, then = self.to_dict()[f.name], saved[f.name]
            if now == then or then is None or f.name in self.unused_on_resume():
                continue
            shown = meta.get("shown") or _flag_name(meta.get("names", (f.name,)))
            was = _shown(shown, then) if isinstance(then, bool) else _value(then)
            line = f"{_shown(shown, now)} (checkpoint: {was})"
            (refused if meta["resume"] == FIXED else allowed).append(line)
        return refused, allowed


def _flag_name(names: tuple[str, ...]) -> str:
    return next((n for n in names if n.startswith("--")), names[0])


def _value(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(flag_name: str, value: Any) -> str:
    if isinstance(value, bool) and flag_name.startswith("--"):
        return flag_name if value else "--no-" + flag_name[2:]
    return f"{flag_name} {_value(value)}"


def per_process_batch(batch_size: int, procs_per_node: int) -> int:
    """The batch of one process: ``-b`` (one node's batch) split evenly over its processes."""
    if batch_size % procs_per_node:
        raise UserError(
            f"-b {batch_size} (the batch of one node) is not divisible by its "
            f"{procs_per_node} processes"
        )
    return batch_size // procs_per_node
