#!/usr/bin/env python
"""The machine the benchmarks run on: GPU and driver, the torch, torchvision, CUDA, cuDNN and NCCL
versions, and whether the project, detectron2, fvcore and pycocotools import. Exits 1 where an
import fails, or where ``--device cuda`` finds no CUDA device (the JSON is written first). DALI,
the peer feed of ``feed_throughput.py``, is reported, its absence not an error.

    python benchmarks/environment.py --device cuda --json environment.json
"""

import importlib
import os
import platform
import shutil
import subprocess
import sys

import common

IMPORTS = ("moco_d2.detection", "detectron2", "fvcore.nn", "pycocotools._mask")


def parse_args(argv):
    p = common.parser(__doc__, "environment.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p.parse_args(argv)


def dali_version() -> str:
    try:
        import nvidia.dali
    except ImportError as e:
        return f"not installed ({e})"
    return nvidia.dali.__version__


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("nvidia-smi"):
        query = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        subprocess.run(["nvidia-smi", *query], check=False)
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": cuda,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpus": os.cpu_count(),
        "compiler": shutil.which("g++") or shutil.which("cc"),
        "dali": dali_version(),
    }
    errors = []
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as e:  # report every missing piece, not only the first
            errors.append(f"{module}: {type(e).__name__}: {e}")
    common.print_table(["", "found"], [*info.items(), ("import errors", "; ".join(errors))])
    summary = f"{info['gpu'] or 'no GPU'}; torch {info['torch']}, cuDNN {info['cudnn']}"
    summary += f", DALI {info['dali']}"
    summary += "".join(f"; {e}" for e in errors)
    common.write_json(args.json, {**info, "import_errors": errors, "summary": summary})
    return 1 if errors or (args.device == "cuda" and not cuda) else 0


if __name__ == "__main__":
    sys.exit(main())
