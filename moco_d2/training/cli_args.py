"""The training flags shared by tools/pretrain_moco.py and tools/lincls.py, with validating types.

Names and meanings are those of the released main_moco.py and main_lincls.py in both tools:
``-b/--batch-size`` is the batch of one node, split evenly over that node's processes, and
``-j/--workers`` is the number of data-loading workers of each process.
"""

import argparse
import os
from collections.abc import Callable, Sequence

from moco_d2.errors import UserError

DEFAULT_WORKERS = min(32, os.cpu_count() or 1)  # the released 32, or fewer on a small machine


def _checked(cast: Callable[[str], float], test: Callable[[float], bool], what: str):
    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")


def add_training_arguments(
    parser: argparse.ArgumentParser,
    *,
    arch_choices: Sequence[str],
    epochs: int,
    lr: float,
    lr_help: str,
    schedule: Sequence[int],
    weight_decay: float,
    print_freq_help: str,
    resume_help: str,
    seed_help: str,
    batch_size: int = 256,
    workers: int = DEFAULT_WORKERS,
) -> None:
    """Add -a, -j, --epochs, --start-epoch, -b, --lr, --schedule, --momentum, --wd, -p, --resume
    and --seed with the given per-tool defaults and help."""
    parser.add_argument(
        "-a",
        "--arch",
        metavar="ARCH",
        default="resnet50",
        choices=arch_choices,
        help="torchvision model (default: resnet50)",
    )
    parser.add_argument(
        "-j",
        "--workers",
        default=workers,
        type=non_negative_int,
        metavar="N",
        help="data-loading workers per process (default: min(32, CPU cores))"
        if workers == DEFAULT_WORKERS
        else f"data-loading workers per process (default: {workers})",
    )
    parser.add_argument(
        "--epochs",
        default=epochs,
        type=positive_int,
        metavar="N",
        help=f"total epochs (default: {epochs})",
    )
    parser.add_argument(
        "--start-epoch",
        default=0,
        type=non_negative_int,
        metavar="N",
        help="first epoch (taken from the checkpoint with --resume)",
    )
    parser.add_argument(
        "-b",
        "--batch-size",
        default=batch_size,
        type=positive_int,
        metavar="N",
        help=f"batch of one node, split evenly over its processes (default: {batch_size})",
    )
    parser.add_argument(
        "--lr",
        "--learning-rate",
        default=lr,
        type=positive_float,
        metavar="LR",
        dest="lr",
        help=lr_help,
    )
    parser.add_argument(
        "--schedule",
        default=list(schedule),
        nargs="*",
        type=non_negative_int,
        metavar="EPOCH",
        help="epochs at which the lr is multiplied by 0.1 (default: "
        + " ".join(map(str, schedule))
        + ")",
    )
    parser.add_argument(
        "--momentum", default=0.9, type=non_negative_float, metavar="M", help="SGD momentum"
    )
    parser.add_argument(
        "--wd",
        "--weight-decay",
        default=weight_decay,
        type=non_negative_float,
        metavar="W",
        dest="weight_decay",
        help=f"weight decay (default: {weight_decay:g})",
    )
    parser.add_argument(
        "-p", "--print-freq", default=10, type=positive_int, metavar="N", help=print_freq_help
    )
    parser.add_argument("--resume", default="", type=str, metavar="PATH", help=resume_help)
    parser.add_argument("--seed", default=None, type=non_negative_int, help=seed_help)


def per_process_batch(batch_size: int, procs_per_node: int) -> int:
    """The batch of one process: ``-b`` (one node's batch) split evenly over its processes."""
    if batch_size % procs_per_node:
        raise UserError(
            f"-b {batch_size} (the batch of one node) is not divisible by its "
            f"{procs_per_node} processes"
        )
    return batch_size // procs_per_node
