"""``tools/convert-to-d2.py INPUT OUTPUT``: a pretraining checkpoint → Detectron2 weights.

The output is written only once the whole ResNet-50 trunk has been found and checked, and
atomically, so a bad input never leaves a file that Detectron2 would half-load.
"""

import pickle
from typing import Any

from moco_d2 import weights
from moco_d2.cli import ArgumentParser
from moco_d2.convert import resnet
from moco_d2.errors import UserError
from moco_d2.utils.fileio import atomic_path

AUTHOR = "moco_d2 convert-to-d2"


def convert(input_path: str) -> tuple[weights.Trunk, dict[str, str]]:
    """Read ``input_path``; return (its :class:`weights.Trunk`, torchvision → Detectron2 names)."""
    trunk = weights.read_trunk(input_path)
    try:
        resnet.check_complete(trunk.tensors)
        resnet.check_finite(trunk.tensors, trunk.sources)
    except UserError as e:
        raise UserError(f"{input_path} ({trunk.format}): {e}; nothing written") from None
    return trunk, {name: resnet.to_detectron2(name) for name in resnet.resnet50_shapes()}


def detectron2_weights(trunk: weights.Trunk, mapping: dict[str, str]) -> dict[str, Any]:
    """The pickle content Detectron2's DetectionCheckpointer reads."""
    model = {d2: trunk.tensors[tv].detach().cpu().numpy() for tv, d2 in mapping.items()}
    return {"model": model, "__author__": f"{AUTHOR} ({trunk.format})", "matching_heuristics": True}


def write(weights: dict, output_path: str) -> None:
    with atomic_path(output_path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(weights, f)


def report(trunk: weights.Trunk, mapping: dict[str, str]) -> str:
    """The mapping, one tensor per line, then what was left out on purpose, one per line."""
    width = max(map(len, mapping))
    lines = [
        f"{tv:<{width}}  ->  {d2}  {list(trunk.tensors[tv].shape)}" for tv, d2 in mapping.items()
    ]
    return "\n".join(lines + [f"dropped  {name}" for name in trunk.dropped])


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="convert-to-d2.py",
        description="Convert a MoCo pretraining checkpoint or a torchvision ResNet-50 "
        "state_dict to Detectron2 weights (.pkl). Refuses anything but a "
        "complete ResNet-50 trunk.",
    )
    parser.add_argument(
        "input", help="checkpoint_XXXX.pth.tar, a query-encoder or torchvision ResNet-50 state_dict"
    )
    parser.add_argument("output", help="Detectron2 weights to write, ending in .pkl")
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
    trunk, mapping = convert(args.input)
    print(f"input format: {trunk.format}")
    if args.report:
        print(report(trunk, mapping))
    write(detectron2_weights(trunk, mapping), args.output)
    print(f"wrote {len(mapping)} tensors to {args.output}")
    return 0
