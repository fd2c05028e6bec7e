"""The ResNet-50 trunk: its 265 tensors, their Detectron2 names, the completeness and finiteness
checks. Renaming by string replacement "converts" a ResNet-18 or a wrongly prefixed checkpoint
without complaint; here every name is parsed, and the whole trunk must be there first."""

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from moco_d2.errors import UserError

if TYPE_CHECKING:
    import torch

BLOCKS = (3, 4, 6, 3)  # bottleneck blocks in layer1..layer4
WIDTHS = (64, 128, 256, 512)  # 3x3 conv channels; block output is 4x that
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
# Known depths by (blocks per stage, bottleneck?), to say what a wrong trunk is.
_DEPTHS: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "ResNet-18",
    ((3, 4, 6, 3), False): "ResNet-34",
    ((3, 4, 6, 3), True): "ResNet-50",
    ((3, 4, 23, 3), True): "ResNet-101",
    ((3, 8, 36, 3), True): "ResNet-152",
}
_SHOWN = 5  # names listed per kind of problem in the one-line error

_BLOCK_NAME = re.compile(r"layer([1-4])\.(\d+)\.(.+)")


def _bn(prefix, channels):
    return {f"{prefix}.{t}": (channels,) for t in BN_TENSORS}


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision name → shape of every conv weight and BN tensor of a ResNet-50 trunk,
    in torchvision's state_dict order."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            for k, shape in enumerate(
                ((width, in_channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)),
                start=1,
            ):
                shapes[f"{p}.conv{k}.weight"] = shape
                shapes.update(_bn(f"{p}.bn{k}", shape[0]))
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", 4 * width))
            in_channels = 4 * width
    return shapes


def to_detectron2(name: str) -> str:
    """Detectron2 ResNet name of a torchvision ResNet conv/BN tensor name."""
    if name == "conv1.weight":
        return "stem.conv1.weight"
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1.") :]
    match = _BLOCK_NAME.fullmatch(name)
    if match:
        stage, block, rest = match.groups()
        prefix = f"res{int(stage) + 1}.{block}."
        conv = re.fullmatch(r"conv(\d)\.weight", rest)
        bn = re.fullmatch(r"bn(\d)\.(\w+)", rest)
        if conv:
            return f"{prefix}conv{conv.group(1)}.weight"
        if bn:
            return f"{prefix}conv{bn.group(1)}.norm.{bn.group(2)}"
        if rest == "downsample.0.weight":
            return f"{prefix}shortcut.weight"
        if rest.startswith("downsample.1."):
            return f"{prefix}shortcut.norm.{rest[len('downsample.1.') :]}"
    raise ValueError(f"not a torchvision ResNet conv/BN tensor name: {name}")


def guess_depth(names: Iterable[str]) -> str | None:
    """'ResNet-18', or the block layout when no known depth matches, or None for no blocks."""
    blocks = [0, 0, 0, 0]
    bottleneck = False
    for name in names:
        match = _BLOCK_NAME.fullmatch(name)
        if match:
            stage, block, rest = match.groups()
            blocks[int(stage) - 1] = max(blocks[int(stage) - 1], int(block) + 1)
            bottleneck |= rest.startswith("conv3.")
    if not any(blocks):
        return None
    layout = (tuple(blocks), bottleneck)
    kind = "bottleneck" if bottleneck else "basic"
    return _DEPTHS.get(layout, f"a ResNet with {'/'.join(map(str, blocks))} {kind} blocks")


def _listed(names):
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", … {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_complete(trunk: Mapping[str, "torch.Tensor"]) -> None:
    """Raise :class:`UserError` unless ``trunk`` is exactly a ResNet-50's 265 tensors.

    ``trunk`` maps torchvision names to tensors (head and BN counters already removed).
    The message names what is missing, unexpected or of the wrong shape.
    """
    expected = resnet50_shapes()
    missing = [n for n in expected if n not in trunk]
    extra = sorted(n for n in trunk if n not in expected)
    wrong = [
        f"{n} {list(trunk[n].shape)} ≠ {list(expected[n])}"
        for n in expected
        if n in trunk and tuple(trunk[n].shape) != expected[n]
    ]
    if not (missing or extra or wrong):
        return
    problems = [
        f"{len(names)} {what} ({_listed(names)})"
        for what, names in (
            ("missing", missing),
            ("unexpected", extra),
            ("with the wrong shape", wrong),
        )
        if names
    ]
    depth = guess_depth(trunk)
    looks = f"; it looks like {depth}" if depth and depth != "ResNet-50" else ""
    raise UserError(f"not a complete ResNet-50 trunk{looks}: " + "; ".join(problems))


def check_finite(trunk: Mapping[str, "torch.Tensor"], sources: Mapping[str, str]) -> None:
    """Raise :class:`UserError` naming the first tensor (in torchvision order, by its name in
    the file) holding NaN or inf: a diverged run must not become detection weights."""
    for name in resnet50_shapes():
        values = trunk[name]
        if values.is_floating_point() and not bool(values.isfinite().all()):
            nan = int(values.isnan().sum())
            inf = int(values.isinf().sum())
            raise UserError(
                f"tensor {sources.get(name, name)} holds non-finite values ({nan} NaN, {inf} inf "
                f"of {values.numel()}): the pretraining run diverged or the file is damaged"
            )
