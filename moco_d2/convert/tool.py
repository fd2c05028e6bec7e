"""``tools/convert-to-d2.py INPUT OUTPUT``: a pretraining checkpoint → Detectron2 weights, written
atomically once the whole ResNet-50 trunk is found and checked, so that a bad input never leaves
a file Detectron2 would half-load; with the input normalisation the weights expect, which
``train_net`` checks. ``train_net`` converts a ``MODEL.WEIGHTS`` checkpoint in memory with it."""

import pickle
from typing import Any

from moco_d2.cli import ArgumentParser
from moco_d2.convert import layouts, resnet
from moco_d2.convert.trunk import Trunk, add_trunk_arguments, read_trunk
from moco_d2.errors import UserError
from moco_d2.io import atomic_path

AUTHOR = "moco_d2 convert-to-d2"
# The extra key of the .pkl that records the input the weights expect (detectron2 ignores it).
NORMALISATION = "input_normalisation"
FORMAT = "RGB"


def checked_mapping(trunk: Trunk) -> dict[str, str]:
    """torchvision → Detectron2 names, once ``trunk`` is a complete, finite ResNet-50."""
    resnet.check_complete(trunk.tensors)
    resnet.check_finite(trunk.tensors, trunk.sources)
    return {name: resnet.to_detectron2(name) for name in resnet.resnet50_shapes()}


def convert(input_path: str, choice: str | None = None) -> tuple[Trunk, dict[str, str]]:
    """Read ``input_path``; return (its :class:`Trunk`, torchvision → Detectron2 names).
    ``choice``: the ``--trunk`` to take."""
    trunk = read_trunk(input_path, choice)
    try:
        return trunk, checked_mapping(trunk)
    except UserError as e:
        raise UserError(f"{input_path} ({trunk.format}): {e}; nothing written") from None


def normalisation_record(input_norm: str | None) -> dict[str, Any] | None:
    """What the .pkl records of ``input_norm`` (a key of layouts.INPUT_NORMS): the config
    values on Detectron2's 0-255 scale."""
    if input_norm is None:
        return None
    norm = layouts.INPUT_NORMS[input_norm]
    return {
        "expects": input_norm,
        "about": norm["about"],
        "MODEL.PIXEL_MEAN": [round(255 * v, 3) for v in norm["mean"]],
        "MODEL.PIXEL_STD": [round(255 * v, 3) for v in norm["std"]],
        "INPUT.FORMAT": FORMAT,
    }


def _listed(values: list[float]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def config_overrides(record: dict[str, Any]) -> str:
    """The train_net options that give the input ``record`` describes."""
    return (
        f'MODEL.PIXEL_MEAN "{_listed(record["MODEL.PIXEL_MEAN"])}" '
        f'MODEL.PIXEL_STD "{_listed(record["MODEL.PIXEL_STD"])}" '
        f"INPUT.FORMAT {record['INPUT.FORMAT']}"
    )


def detectron2_weights(
    trunk: Trunk, mapping: dict[str, str], input_norm: str | None = None
) -> dict[str, Any]:
    """The pickle content Detectron2's DetectionCheckpointer reads, with the input record.
    Floating tensors are written as float32 whatever their stored dtype (numpy has no bfloat16,
    and Detectron2's models are float32)."""
    model = {}
    for tv, d2 in mapping.items():
        tensor = trunk.tensors[tv].detach().cpu()
        model[d2] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    data = {"model": model, "__author__": f"{AUTHOR} ({trunk.format})", "matching_heuristics": True}
    record = normalisation_record(input_norm)
    if record is not None:
        data[NORMALISATION] = record
    return data


def summary(trunk: Trunk, input_norm: str | None) -> list[str]:
    """What was read: the layout, the second trunks left out, the input the weights expect."""
    lines = [f"input format: {trunk.format}"]
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in trunk.tensors.values()})
    if any(d in ("bfloat16", "float16", "float64") for d in stored):
        lines.append(f"stored as {', '.join(stored)}: converted to float32")
    if trunk.second:
        lines.append(
            f"second trunks dropped (--trunk takes one instead): {', '.join(trunk.second)}"
        )
    record = normalisation_record(input_norm)
    if record is None:
        lines.append(
            "input normalisation: not recorded, the layout does not say it (--input-norm "
            "imagenet for most releases, rgb01 for TF-converted SimCLR v1)"
        )
    else:
        lines.append(f"input normalisation: {record['about']}: {config_overrides(record)}")
    return lines


def write(weights: dict, output_path: str) -> None:
    with atomic_path(output_path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(weights, f)


def report(trunk: Trunk, mapping: dict[str, str]) -> str:
    """The mapping, one tensor per line, then what was left out on purpose, one per line."""
    width = max(map(len, mapping))
    lines = [
        f"{tv:<{width}}  ->  {d2}  {list(trunk.tensors[tv].shape)}" for tv, d2 in mapping.items()
    ]
    return "\n".join(lines + [f"dropped  {name}" for name in trunk.dropped])


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="convert-to-d2.py",
        description="Convert the checkpoint of a self-supervised ResNet-50 (MoCo, SwAV, DINO, "
        "Barlow Twins, ...; docs/transfer.md lists the releases) or a torchvision ResNet-50 "
        "state_dict to Detectron2 weights (.pkl). Refuses anything but a complete ResNet-50 "
        "trunk.",
    )
    parser.add_argument(
        "input",
        help="checkpoint_XXXX.pth.tar, another release's checkpoint (.pth, .pth.tar, .ckpt, "
        ".torch, .bin, .safetensors), or a ResNet-50 state_dict",
    )
    parser.add_argument("output", help="Detectron2 weights to write, ending in .pkl")
    add_trunk_arguments(parser)
    parser.add_argument(
        "--report",
        action="store_true",
        help="list every tensor's torchvision and Detectron2 name and shape",
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        raise UserError(
            f"output {args.output} must end in .pkl: Detectron2 reads only .pkl "
            "files as converted (name-matched) weights"
        )
    trunk, mapping = convert(args.input, args.trunk)
    input_norm = args.input_norm or trunk.input_norm
    print("\n".join(summary(trunk, input_norm)))
    if args.report:
        print(report(trunk, mapping))
    write(detectron2_weights(trunk, mapping, input_norm), args.output)
    print(f"wrote {len(mapping)} tensors to {args.output}")
    return 0
