#!/usr/bin/env python
"""How far a sane detector fine-tuning stays from the divergence bounds of the health check.

Runs tools/train_net.py's Trainer in this process on a synthetic VOC tree with the test suite's
tiny R50-C4 settings (tests/transfer_tiny.py; BASE_LR 0.02 at 2 images per iteration, 8 times the
protocol's per-image rate), once from random-init torchvision weights through the converter and
once from detectron2's own random init, and reports per run the largest weight-norm ratio
(against the loaded weights) and BN running_var the check read, with the bounds. Prints a table
and writes JSON.

    python benchmarks/detector_health_margin.py --iters 40 --json out.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import torchvision  # noqa: E402
from transfer_tiny import TINY_OPTS  # noqa: E402

from moco_d2.convert import tool as convert  # noqa: E402
from moco_d2.detection.data.synthetic import make_synthetic_voc  # noqa: E402
from moco_d2.detection.data.voc import register_all_voc  # noqa: E402
from moco_d2.detection.train_net import argument_parser, setup  # noqa: E402
from moco_d2.detection.trainer import Trainer  # noqa: E402
from moco_d2.training.health import MAX_NORM_RATIO, MAX_RUNNING_VAR  # noqa: E402


def run(weights: str, out: str, iters: int) -> dict:
    args = argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, "configs", "voc_R50_C4.yaml"), *TINY_OPTS]
        + ["SOLVER.MAX_ITER", str(iters), "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out]
    )
    trainer = Trainer(setup(args))
    trainer.resume_or_load(resume=False)
    bns = [
        m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    start_var = max(m.running_var.max().item() for m in bns)
    trainer.train()
    ratio = trainer.storage.history("health_max_weight_ratio").values()
    var = trainer.storage.history("health_max_bn_running_var").values()
    top_ratio, at_ratio = max(ratio)
    top_var, at_var = max(var)
    return {
        "iterations": len(ratio),
        "max_weight_ratio": top_ratio,
        "at_iteration": at_ratio + 1,
        "weight_ratio_last": ratio[-1][0],
        "bn_running_var_at_start": start_var,
        "max_bn_running_var": top_var,
        "var_at_iteration": at_var + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_voc(os.path.join(tmp, "voc"), num_train=8, num_test=4, image_size=64)
        register_all_voc(os.path.join(tmp, "voc"))
        torch.save(torchvision.models.resnet50().state_dict(), os.path.join(tmp, "r50.pth"))
        converted = os.path.join(tmp, "converted.pkl")
        convert.main([os.path.join(tmp, "r50.pth"), converted])
        for name, weights in (("converted random init", converted), ("detectron2 init", "")):
            rows[name] = run(weights, os.path.join(tmp, name.replace(" ", "_")), a.iters)
    print(f"\nbounds: weight-norm ratio {MAX_NORM_RATIO:g}, BN running_var {MAX_RUNNING_VAR:g}")
    header = ("start", "max ratio", "at it", "var start", "max var", "at it")
    print("{:24} {:>10} {:>6} {:>10} {:>10} {:>6}".format(*header))
    for name, r in rows.items():
        print(
            f"{name:24} {r['max_weight_ratio']:10.3g} {r['at_iteration']:6d} "
            f"{r['bn_running_var_at_start']:10.3g} {r['max_bn_running_var']:10.3g} "
            f"{r['var_at_iteration']:6d}"
        )
    if a.json:
        result = {
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "iters": a.iters,
            "bounds": {"weight_ratio": MAX_NORM_RATIO, "bn_running_var": MAX_RUNNING_VAR},
            "runs": rows,
        }
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
