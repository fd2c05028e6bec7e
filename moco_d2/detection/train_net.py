"""``tools/train_net.py``: fine-tune a converted backbone on VOC07+12 and evaluate on VOC07.

    tools/train_net.py --config-file configs/voc_R50_C4.yaml --num-gpus 8 MODEL.WEIGHTS moco.pkl
    tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU processes (gloo).
"""

import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer
from moco_d2.detection.data.coco import check_coco_datasets
from moco_d2.detection.data.voc import check_split_files
from moco_d2.detection.launch import launch
from moco_d2.detection.norm import resolve_sync_bn
from moco_d2.detection.trainer import Trainer
from moco_d2.errors import UserError


def load_config(args):
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


def check_inputs(cfg, args):
    """Catch mistakes before any process starts, so they are one line, not N tracebacks."""
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("MODEL.DEVICE is cuda but CUDA is not available; add MODEL.DEVICE cpu")
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    weights = cfg.MODEL.WEIGHTS
    if weights and not resuming and "://" not in weights and not os.path.isfile(weights):
        raise UserError(
            f"MODEL.WEIGHTS file not found: {weights!r} (convert a pretraining "
            'checkpoint with tools/convert-to-d2.py; MODEL.WEIGHTS "" trains from '
            "random initialization on purpose)"
        )
    check_split_files(
        cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    )
    check_coco_datasets(
        cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    )


def setup(args):
    """Per-process config and logging (Detectron2's default_setup)."""
    cfg = load_config(args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="moco_d2")
    resolve_sync_bn(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def run(args):
    """Train then evaluate, or only evaluate (``--eval-only``), in one process."""
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


def main(argv):
    args = default_argument_parser().parse_args(argv)
    cfg = load_config(args)
    check_inputs(cfg, args)
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
