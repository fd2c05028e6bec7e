"""Command line of tools/lincls.py: the released main_lincls.py flags plus a few of ours."""

import argparse
import functools

from moco_d2.cli import ArgumentParser
from moco_d2.convert import trunk
from moco_d2.errors import UserError
from moco_d2.lincls.model import ARCHS
from moco_d2.lincls.train import finished, prepare, worker
from moco_d2.training.cli_args import add_training_arguments, per_process_batch, positive_int
from moco_d2.training.distributed import add_distributed_arguments, launch, procs_per_node


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="lincls.py",
        description="Linear classification on frozen features of a pretrained ResNet "
        "(MoCo protocol)",
        epilog="-b is the batch of one node, split evenly over its processes, and -j the "
        "data-loading workers of each process, as in the released main_lincls.py.",
    )
    parser.add_argument("data", metavar="DIR", help="ImageFolder root with train/ and val/")
    add_training_arguments(
        parser,
        arch_choices=ARCHS,
        epochs=100,
        lr=30.0,
        lr_help="initial learning rate (default: 30)",
        schedule=(60, 80),
        weight_decay=0.0,
        print_freq_help="progress-bar refresh frequency in iterations (default: 10)",
        resume_help="path to a checkpoint.pth.tar of this tool to continue from",
        seed_help="seed for initializing training",
    )
    parser.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on val/")
    parser.add_argument(
        "--pretrained",
        default="",
        type=str,
        metavar="PATH",
        help="pretrained checkpoint: ours, another release's (those the converter reads), "
        "or a torchvision state_dict",
    )
    trunk.add_trunk_arguments(parser)
    parser.add_argument(
        "--output-dir",
        default="output/lincls",
        metavar="DIR",
        help="checkpoints, log.txt, TensorBoard logs and results.json (default: output/lincls)",
    )
    parser.add_argument(
        "--amp", action="store_true", help="bf16 autocast where the device supports it"
    )
    parser.add_argument(
        "--crop-size",
        default=224,
        type=positive_int,
        metavar="PX",
        help="train RandomResizedCrop and val CenterCrop size (default: 224)",
    )
    parser.add_argument(
        "--resize",
        default=256,
        type=positive_int,
        metavar="PX",
        help="val Resize before the center crop (default: 256)",
    )
    add_distributed_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.evaluate and not args.resume:
        raise UserError("-e/--evaluate needs a trained classifier: pass --resume PATH")
    per_process_batch(args.batch_size, max(procs_per_node(args), 1))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepared = prepare(args)  # bad input fails here, once, before any process is spawned
    if finished(prepared, args):
        return 0
    # spawned workers prepare their own (a model and datasets do not travel well); a launch of
    # one process in total runs here and reuses what was prepared
    spawns = args.multiprocessing_distributed and procs_per_node(args) * max(args.world_size, 1) > 1
    launch(functools.partial(worker, prepared=None if spawns else prepared), args)
    return 0
