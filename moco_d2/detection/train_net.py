"""``tools/train_net.py``: fine-tune a converted backbone on VOC07+12 and evaluate on VOC07.

    tools/train_net.py --config-file configs/voc_R50_C4.yaml --num-gpus 8 MODEL.WEIGHTS moco.pkl
    tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU processes (gloo). ``MODEL.WEIGHTS``
may also name a pretraining checkpoint, converted in memory; ``--coco-dataset`` registers a
COCO-format dataset of one's own, in every process.
"""

import argparse
import os

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from moco_d2.cli import ArgumentParser
from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer, read_detectron2_file
from moco_d2.detection.data.coco import add_coco_dataset_argument, register_coco_datasets
from moco_d2.detection.launch import launch
from moco_d2.detection.norm import resolve_sync_bn
from moco_d2.detection.preflight import check_before_launch, resume_checkpoint
from moco_d2.detection.trainer import METRICS_FILE, Trainer
from moco_d2.errors import UserError
from moco_d2.io import remove_stale_temporaries


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` (its flags and ``--help``), whose mistakes are
    one line and exit 2 like those of the other tools, not a usage block."""
    parser = default_argument_parser()
    parser.__class__ = ArgumentParser
    add_coco_dataset_argument(parser)
    return parser


def load_config(args: argparse.Namespace) -> CfgNode:
    """The config file merged with the command-line opts; input mistakes are UserErrors."""
    if not os.path.isfile(args.config_file):
        raise UserError(f"config file not found: {args.config_file!r} (--config-file)")
    cfg = get_cfg()
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise UserError(f"config {args.config_file}: {e}") from None
    return cfg


def finished(cfg: CfgNode, args: argparse.Namespace) -> bool:
    """True (and says so) when ``--resume`` names a run that reached SOLVER.MAX_ITER and wrote
    its metrics; one killed during the final evaluation resumes into that evaluation."""
    checkpoint = resume_checkpoint(cfg.OUTPUT_DIR) if args.resume and not args.eval_only else None
    metrics = os.path.join(cfg.OUTPUT_DIR, METRICS_FILE)
    if checkpoint is None or not os.path.isfile(checkpoint) or not os.path.isfile(metrics):
        return False
    iteration = read_detectron2_file(checkpoint).get("iteration")
    if not isinstance(iteration, int) or iteration + 1 < cfg.SOLVER.MAX_ITER:
        return False
    print(
        f"nothing to do: {checkpoint} already finished iteration {iteration + 1} of "
        f"SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} and its metrics are in {metrics}; evaluate "
        "again with --eval-only, or raise SOLVER.MAX_ITER to train longer"
    )
    return True


def setup(args: argparse.Namespace) -> CfgNode:
    """Per-process config and logging (Detectron2's default_setup)."""
    cfg = load_config(args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="moco_d2")
    resolve_sync_bn(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def run(args: argparse.Namespace) -> dict | None:
    """Train then evaluate, or only evaluate (``--eval-only``), in one process."""
    register_coco_datasets(args.coco_dataset)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        BackboneCheckingCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    register_coco_datasets(args.coco_dataset)
    cfg = load_config(args)
    if finished(cfg, args):
        return 0
    check_before_launch(cfg, args)
    remove_stale_temporaries(cfg.OUTPUT_DIR)
    device = torch.device(cfg.MODEL.DEVICE).type
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )
    return 0
