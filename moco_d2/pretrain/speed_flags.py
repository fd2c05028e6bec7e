"""Flags for the fast path of pretraining: augmentation and JPEG decoding on the device,
channels-last, compile.

Defaults follow the device: on CUDA the batch is decoded and augmented on the GPU and stored
channels-last; on CPU the PIL path in the DataLoader workers stays the default. The CUDA default
of ``--decode-on`` is ``device`` because batched nvJPEG decoding takes JPEG decoding, most of the
workers' host time, off the CPU; it is to be confirmed by ``benchmarks/pretrain_throughput.py``
on a GPU (not measured yet).
"""

import argparse

import torch

from moco_d2.errors import UserError


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--augment-on",
        choices=["loader", "device"],
        default=None,
        help="where the views are augmented: 'loader' (PIL in the DataLoader workers) or "
        "'device' (workers only decode and crop; color jitter, grayscale, blur, flip and "
        "normalize run batched on the training device). Default: device on CUDA or with "
        "--decode-on device, else loader",
    )
    speed.add_argument(
        "--decode-on",
        choices=["loader", "device"],
        default=None,
        help="where JPEGs are decoded with --augment-on device: 'loader' (PIL in the DataLoader "
        "workers) or 'device' (workers only read the file and draw the crop boxes; the batch "
        "is decoded with torchvision.io.decode_jpeg on the training device, nvJPEG on CUDA). "
        "'device' implies --augment-on device. Default: device on CUDA with --augment-on "
        "device, else loader (the CUDA default is to be confirmed with "
        "benchmarks/pretrain_throughput.py; not measured yet)",
    )
    speed.add_argument(
        "--channels-last",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="channels-last memory format for the encoders (default: on for CUDA)",
    )
    speed.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the query and key encoders (off by default)",
    )


def check_speed_arguments(args: argparse.Namespace) -> None:
    """Refuse flag combinations that no device makes work, before any process starts."""
    if args.decode_on == "device" and args.augment_on == "loader":
        raise UserError(
            "--decode-on device needs --augment-on device (the loader path augments PIL "
            "images in the workers)"
        )


def resolve_speed_arguments(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the device-dependent defaults of :func:`add_speed_arguments` in place."""
    check_speed_arguments(args)
    cuda = device.type == "cuda"
    if args.augment_on is None:
        args.augment_on = "device" if cuda or args.decode_on == "device" else "loader"
    if args.decode_on is None:
        args.decode_on = "device" if cuda and args.augment_on == "device" else "loader"
    if args.channels_last is None:
        args.channels_last = cuda
