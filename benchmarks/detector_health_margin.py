#!/usr/bin/env python
"""How far a sane detector fine-tuning stays from the divergence bounds of the health check.

Runs tools/train_net.py's Trainer in this process on a synthetic VOC tree with the test suite's
tiny R50-C4 settings (tests/transfer_tiny.py; BASE_LR 0.02 at 2 images per iteration, 8 times the
protocol's per-image rate), from random-init torchvision weights through the converter and from
detectron2's own random init, each fresh and resumed (the state of a run killed after its first
checkpoint: iteration 0 saved, then ``--resume``). Reports per run the largest layer-norm ratio
the check read (against the loaded or resumed weights), the largest ratio of one tensor on its
own (the rule before the per-layer one, which stopped resumed runs), and the largest BN
running_var, with the bounds. Prints a table and writes JSON.

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
from transfer_tiny import TINY_OPTS  # noqa: E402  (moco_d2.detection's shims before detectron2)

# isort: split
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from moco_d2.convert import tool as convert  # noqa: E402
from moco_d2.detection.data.synthetic import make_synthetic_voc  # noqa: E402
from moco_d2.detection.data.voc import register_all_voc  # noqa: E402
from moco_d2.detection.train_net import argument_parser, setup  # noqa: E402
from moco_d2.detection.trainer import Trainer  # noqa: E402
from moco_d2.training.health import LAYER_RMS_FLOOR, MAX_NORM_RATIO, MAX_RUNNING_VAR, norms  # noqa: E402


class TensorRatio(HookBase):
    """After each step, the largest norm of one tensor over its norm at the start (tensors at
    zero skipped): what the check read before it judged layers."""

    def before_train(self) -> None:
        self.params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        self.start = norms([p.detach() for p in self.params])
        self.largest = 0.0

    def after_step(self) -> None:
        ratio = norms([p.detach() for p in self.params]) / self.start
        self.largest = max(self.largest, ratio[self.start > 0].max().item())


def trainer_for(weights: str, out: str, iters: int, *opts: str) -> Trainer:
    args = argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, "configs", "voc_R50_C4.yaml"), *TINY_OPTS]
        + ["SOLVER.MAX_ITER", str(iters), "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out, *opts]
    )
    return Trainer(setup(args))


def save_first_checkpoint(weights: str, out: str, iters: int) -> None:
    """Iteration 0 and its checkpoint, then nothing more: what a run killed there leaves."""
    trainer = trainer_for(weights, out, iters, "SOLVER.CHECKPOINT_PERIOD", "1")
    trainer.resume_or_load(resume=False)
    trainer.iter = trainer.start_iter = 0
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()


def run(weights: str, out: str, iters: int, resume: bool) -> dict:
    if resume:
        save_first_checkpoint(weights, out, iters)
    trainer = trainer_for(weights, out, iters)
    trainer.resume_or_load(resume=resume)
    tensor_ratio = TensorRatio()
    trainer.register_hooks([tensor_ratio])
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
        "start_iteration": trainer.start_iter,
        "iterations": len(ratio),
        "max_weight_ratio": top_ratio,
        "at_iteration": at_ratio + 1,
        "weight_ratio_last": ratio[-1][0],
        "max_tensor_ratio": tensor_ratio.largest,
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
            for resume in (False, True):
                row = f"{name}{', resumed' if resume else ''}"
                out = os.path.join(tmp, row.replace(" ", "_").replace(",", ""))
                rows[row] = run(weights, out, a.iters, resume)
    print(
        f"\nbounds: layer-norm ratio {MAX_NORM_RATIO:g} (reference floored at "
        f"{LAYER_RMS_FLOOR:g} per element), BN running_var {MAX_RUNNING_VAR:g}"
    )
    header = ("start", "max ratio", "at it", "tensor", "var start", "max var", "at it")
    print("{:34} {:>10} {:>6} {:>10} {:>10} {:>10} {:>6}".format(*header))
    for name, r in rows.items():
        print(
            f"{name:34} {r['max_weight_ratio']:10.3g} {r['at_iteration']:6d} "
            f"{r['max_tensor_ratio']:10.3g} {r['bn_running_var_at_start']:10.3g} "
            f"{r['max_bn_running_var']:10.3g} {r['var_at_iteration']:6d}"
        )
    if a.json:
        result = {
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "iters": a.iters,
            "bounds": {
                "layer_norm_ratio": MAX_NORM_RATIO,
                "layer_rms_floor": LAYER_RMS_FLOOR,
                "bn_running_var": MAX_RUNNING_VAR,
            },
            "runs": rows,
        }
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
