"""Where each self-supervised release keeps its ResNet trunk, what the rest of its file is, and
its names and input normalisation: the rules :func:`.trunk.find_trunk` applies, taken from each
release's own saving or converting code (docs/transfer.md). Names are matched whole, one dotted
component at a time (``"backbone" in key`` would also match ``momentum_backbone``); anything no
rule names is kept, for the completeness checks of the converter and lincls to refuse."""

import re
from collections.abc import Iterable
from typing import Any

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD

# Entries of a checkpoint that may hold the state_dict, in the order they are looked at.
# "model" only counts when it holds tensors: Detectron2 weights hold numpy arrays there.
CONTAINERS = (
    ("state_dict",),  # MoCo v1-v3, SwAV, DenseCL/mm*, Lightning (.ckpt), timm, SimCLR v1 converted
    ("model",),  # Barlow Twins, VICReg, PixPro
    ("teacher",),  # DINO: its eval scripts' --checkpoint_key default
    ("resnet",),  # SimCLR v2 converted by SimCLRv2-Pytorch
    ("classy_state_dict", "base_model", "model", "trunk"),  # VISSL training checkpoints
    ("model_state_dict",),  # VISSL
)
# Wrappers that prefix every name: DistributedDataParallel, then torch.compile.
WRAPPERS = ("module.", "_orig_mod.")
# Prefixes of the trunk the authors evaluate, in order of precedence.
PRIMARY = ("backbone", "encoder_q", "base_encoder", "encoder", "_feature_blocks")
# OpenSelfSup, DenseCL and mmselfsup 0.x register their backbone a second time inside
# encoder_q (MoCo, DenseCL) or online_net (BYOL): the same tensors under a second name.
BACKBONE_ALIASES = ("encoder_q", "online_net")
# Second trunks and their heads: key, momentum, target, teacher and student copies.
_SECOND = re.compile(
    r"encoder_k|online_net|(?:momentum|target|teacher|student)_\w+|\w+_(?:momentum|k)"
)
# Parts that are not a trunk: projection and prediction heads, prototypes, classifiers,
# queues, losses with state, Barlow Twins' final BN.
HEADS = frozenset(
    "fc head heads neck projector projection_head projector_instance predictor prediction_head "
    "prototypes classifier online_classifier value_transform criterion bn queue queue_ptr queue2 "
    "queue2_ptr".split()
)
# First name components of a torchvision ResNet; digits are nn.Sequential(*children()).
_TORCHVISION_TOP = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})
# A ResNet trunk's first block, torchvision-named or at its nn.Sequential index.
_FIRST_BLOCK = re.compile(r"(.*?)(?:layer1|4)\.0\.conv1\.weight")
# nn.Sequential(*resnet.children())[:-1]: conv1, bn1, relu, maxpool, layer1..4, avgpool.
_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

IMAGENET = "imagenet"
RGB01 = "rgb01"
# Input normalisation, with mean and std on the [0, 1] scale of ToTensor.
INPUT_NORMS: dict[str, dict[str, Any]] = {
    IMAGENET: {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "about": "RGB with ImageNet mean/std (PyTorch releases)",
    },
    RGB01: {
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "about": "RGB in [0, 1] with no mean/std (TF-trained SimCLR)",
    },
}


def group_of(name: str) -> str:
    """The part of the file a name belongs to: its first component, or "" for a bare
    torchvision (or nn.Sequential) ResNet name and its ``fc`` head."""
    top = name.split(".", 1)[0]
    return "" if top in _TORCHVISION_TOP or top.isdigit() or top == "fc" else top


def trunk_prefix(names: Iterable[str]) -> str | None:
    """The prefix under which ``names`` hold a ResNet trunk ("" for bare names), or None."""
    for name in names:
        match = _FIRST_BLOCK.fullmatch(name)
        if match:
            return match.group(1).rstrip(".")
    return None


def is_second(group: str) -> bool:
    """A key, momentum, target, teacher or student copy, or one of their heads."""
    return bool(_SECOND.fullmatch(group))


def is_head(group: str) -> bool:
    return group in HEADS or is_second(group)


def sequential_name(name: str) -> str:
    """torchvision name of an ``nn.Sequential(*resnet.children())`` name (lightly's recipe)."""
    top, _, rest = name.partition(".")
    return f"{_SEQUENTIAL[top]}.{rest}" if top in _SEQUENTIAL and rest else name


# SimCLR v2 as converted by Separius/SimCLRv2-Pytorch (its resnet.py): net.0 is the stem
# (conv, BatchNormRelu), net.1..4 the stages of Blocks, each block a projection shortcut
# (block 0) and net = conv, BNReLU, conv, BNReLU, conv, BN; BatchNormRelu is Sequential(BN, ReLU).
_SIMCLR_BLOCK = re.compile(r"net\.([1-4])\.blocks\.(\d+)\.(.+)")
_SIMCLR_IN_BLOCK = {
    "projection.shortcut.weight": "downsample.0.weight",
    "net.0.weight": "conv1.weight",
    "net.2.weight": "conv2.weight",
    "net.4.weight": "conv3.weight",
}
_SIMCLR_BN = re.compile(r"(projection\.bn|net\.[135])\.0\.(\w+)")
_SIMCLR_BN_NAMES = {"projection.bn": "downsample.1", "net.1": "bn1", "net.3": "bn2", "net.5": "bn3"}
_SIMCLR_SK = re.compile(
    r".*\.(?:main_conv|mixing_conv)\..*|.*projection\.shortcut\.2\..*|net\.0\.2\..*"
)


def is_simclr_v2(names: Iterable[str]) -> bool:
    return any(_SIMCLR_BLOCK.fullmatch(name) for name in names)


def simclr_v2_variant(names: Iterable[str], stem_channels: int) -> str | None:
    """What makes a SimCLR v2 network other than r50_1x_sk0's layout, or None: selective
    kernels (sk1) or a width multiplier above 1x."""
    if any(_SIMCLR_SK.fullmatch(name) for name in names):
        return "with selective kernels (sk1)"
    if stem_channels != 64:
        return f"of width {stem_channels // 64}x"
    return None


def simclr_v2_name(name: str) -> str:
    """torchvision name of a SimCLR v2 (sk0) tensor name; other names are returned unchanged."""
    if name == "net.0.0.weight":
        return "conv1.weight"
    stem_bn = re.fullmatch(r"net\.0\.1\.0\.(\w+)", name)
    if stem_bn:
        return f"bn1.{stem_bn.group(1)}"
    block = _SIMCLR_BLOCK.fullmatch(name)
    if not block:
        return name
    stage, index, rest = block.groups()
    prefix = f"layer{stage}.{index}."
    if rest in _SIMCLR_IN_BLOCK:
        return prefix + _SIMCLR_IN_BLOCK[rest]
    bn = _SIMCLR_BN.fullmatch(rest)
    return prefix + f"{_SIMCLR_BN_NAMES[bn.group(1)]}.{bn.group(2)}" if bn else name
