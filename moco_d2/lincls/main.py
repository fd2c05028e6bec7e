"""Command line of tools/lincls.py: the released main_lincls.py flags plus a few of ours."""

import argparse
import functools

from moco_d2.errors import UserError
from moco_d2.lincls.model import ARCHS
from moco_d2.lincls.train import finished, prepare, worker
from moco_d2.training.distributed import add_distributed_arguments, launch


def build_parser():
    parser = argparse.ArgumentParser(
        description="Linear classification on frozen features of a pretrained ResNet "
        "(MoCo protocol)"
    )
    parser.add_argument("data", metavar="DIR", help="ImageFolder root with train/ and val/")
    parser.add_argument(
        "-a",
        "--arch",
        metavar="ARCH",
        default="resnet50",
        choices=ARCHS,
        help="model architecture: " + " | ".join(ARCHS) + " (default: resnet50)",
    )
    parser.add_argument(
        "-j",
        "--workers",
        default=32,
        type=int,
        metavar="N",
        help="data loading workers per node (default: 32)",
    )
    parser.add_argument(
        "--epochs", default=100, type=int, metavar="N", help="total epochs (default: 100)"
    )
    parser.add_argument(
        "--start-epoch",
        default=0,
        type=int,
        metavar="N",
        help="manual epoch number (useful on restarts)",
    )
    parser.add_argument(
        "-b",
        "--batch-size",
        default=256,
        type=int,
        metavar="N",
        help="total batch size over all processes (default: 256)",
    )
    parser.add_argument(
        "--lr",
        "--learning-rate",
        default=30.0,
        type=float,
        metavar="LR",
        dest="lr",
        help="initial learning rate (default: 30)",
    )
    parser.add_argument(
        "--schedule",
        default=[60, 80],
        nargs="*",
        type=int,
        help="epochs at which the lr drops by 10x (default: 60 80)",
    )
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    parser.add_argument(
        "--wd",
        "--weight-decay",
        default=0.0,
        type=float,
        metavar="W",
        dest="weight_decay",
        help="weight decay (default: 0)",
    )
    parser.add_argument(
        "-p",
        "--print-freq",
        default=10,
        type=int,
        metavar="N",
        help="progress-bar refresh frequency in iterations (default: 10)",
    )
    parser.add_argument(
        "--resume",
        default="",
        type=str,
        metavar="PATH",
        help="path to a checkpoint.pth.tar of this tool to continue from",
    )
    parser.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on val/")
    parser.add_argument("--seed", default=None, type=int, help="seed for initializing training")
    parser.add_argument(
        "--pretrained",
        default="",
        type=str,
        metavar="PATH",
        help="pretrained checkpoint: ours, released MoCo, or a torchvision state_dict",
    )
    parser.add_argument(
        "--output-dir",
        default="output/lincls",
        metavar="DIR",
        help="checkpoints, TensorBoard logs and results.json (default: output/lincls)",
    )
    parser.add_argument(
        "--amp", action="store_true", help="bf16 autocast where the device supports it"
    )
    parser.add_argument(
        "--crop-size",
        default=224,
        type=int,
        metavar="PX",
        help="train RandomResizedCrop and val CenterCrop size (default: 224)",
    )
    parser.add_argument(
        "--resize",
        default=256,
        type=int,
        metavar="PX",
        help="val Resize before the center crop (default: 256)",
    )
    add_distributed_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag, value in (
        ("-b/--batch-size", args.batch_size),
        ("--epochs", args.epochs),
        ("--crop-size", args.crop_size),
        ("--resize", args.resize),
        ("-p/--print-freq", args.print_freq),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.workers < 0:
        raise UserError(f"-j/--workers must be at least 0, got {args.workers}")
    if args.evaluate and not args.resume:
        raise UserError("-e/--evaluate needs a trained classifier: pass --resume PATH")
    return args


def main(argv=None):
    args = parse_args(argv)
    prepared = prepare(args)  # bad input fails here, once, before any process is spawned
    if finished(prepared, args):
        return 0
    launch(
        functools.partial(worker, prepared=None if args.multiprocessing_distributed else prepared),
        args,
    )
    return 0
