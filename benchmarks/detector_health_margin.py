#!/usr/bin/env python
"""How far a sane detector fine-tuning stays from the divergence bounds of the health check.

Runs tools/train_net.py's Trainer in this process on a synthetic VOC tree with tiny R50-C4
settings (``TINY_OPTS``, the transfer tests' own; BASE_LR 0.02 at 2 images per iteration, 8
times the protocol's per-image rate), from random-init torchvision weights through the converter
and from detectron2's own random init, each fresh and resumed (the state of a run killed after
its first checkpoint: iteration 0 saved, then ``--resume``). Reports per run the largest
layer-norm ratio the check read (against the loaded or resumed weights), the largest ratio of one
tensor on its own (the rule before the per-layer one, which stopped resumed runs), and the
largest BN running_var, with the bounds. Prints a table and writes JSON.

    python benchmarks/detector_health_margin.py --iters 40 --json out.json
"""

import os
import tempfile

import common
import torch
import torchvision

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)

# isort: split
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

from moco_d2.convert import tool as convert
from moco_d2.detection.data.voc import register_all_voc
from moco_d2.detection.train_net import argument_parser, setup
from moco_d2.detection.trainer import Trainer

# R50-C4 cheap enough for a CPU: small images, few ROIs and proposals, 2 precise-BN iterations
TINY_OPTS = [
    "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
]  # fmt: skip


def norms(tensors: list) -> torch.Tensor:
    """Per-tensor L2 norms."""
    return torch.stack([t.norm() for t in tensors])


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
        ["--config-file", os.path.join(common.REPO, "configs", "voc_R50_C4.yaml"), *TINY_OPTS]
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


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "detector_health_margin.json")
    parser.add_argument("--iters", type=int, default=40)
    a = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        voc = common.synthetic_voc(os.path.join(tmp, "voc"), 8, 4, 64, classes=4, objects=2)
        register_all_voc(voc)
        torch.save(torchvision.models.resnet50().state_dict(), os.path.join(tmp, "r50.pth"))
        converted = os.path.join(tmp, "converted.pkl")
        convert.main([os.path.join(tmp, "r50.pth"), converted])
        for name, weights in (("converted random init", converted), ("detectron2 init", "")):
            for resume in (False, True):
                row = f"{name}{', resumed' if resume else ''}"
                out = os.path.join(tmp, row.replace(" ", "_").replace(",", ""))
                rows[row] = run(weights, out, a.iters, resume)
    bounds = common.health_bounds()
    keys = ("max_weight_ratio", "at_iteration", "max_tensor_ratio", "bn_running_var_at_start")
    keys += ("max_bn_running_var", "var_at_iteration")
    common.print_table(
        ["start", "max ratio", "at it", "tensor", "var start", "max var", "at it"],
        [[name, *(r[k] for k in keys)] for name, r in rows.items()],
        f"\nbounds: layer-norm ratio {bounds['layer_norm_ratio']:g} (reference floored at "
        f"{bounds['layer_rms_floor']:g} per element), BN running_var "
        f"{bounds['bn_running_var']:g}",
    )
    result = {
        **common.machine(torch.device("cpu")),
        "iters": a.iters,
        "bounds": bounds,
        "runs": rows,
    }
    common.write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
