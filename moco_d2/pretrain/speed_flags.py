"""Flags for the fast path of pretraining: augmentation on the device, channels-last, compile.

Defaults follow the device: on CUDA the batch is augmented on the GPU and stored channels-last;
on CPU the PIL path in the DataLoader workers stays the default.
"""

import argparse

import torch


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--augment-on",
        choices=["loader", "device"],
        default=None,
        help="where the views are augmented: 'loader' (PIL in the DataLoader workers) or "
        "'device' (workers only decode and crop; color jitter, grayscale, blur, flip and "
        "normalize run batched on the training device). Default: device on CUDA, else loader",
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


def resolve_speed_arguments(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the device-dependent defaults of :func:`add_speed_arguments` in place."""
    cuda = device.type == "cuda"
    if args.augment_on is None:
        args.augment_on = "device" if cuda else "loader"
    if args.channels_last is None:
        args.channels_last = cuda
