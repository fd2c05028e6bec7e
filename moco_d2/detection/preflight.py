"""Checks that run before ``train_net`` launches any process, so that a mistake is one line
naming the config key or file at fault, within seconds, not a traceback per process after hours
of training."""

import argparse
import difflib
import math
import os
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from moco_d2.convert import tool
from moco_d2.detection.checkpoint import (
    LAST_CHECKPOINT,
    input_record,
    local_weights,
    non_finite_tensor,
    read_detectron2_file,
)
from moco_d2.detection.data.coco import CocoSummary, check_coco_datasets
from moco_d2.detection.data.voc import check_split_files
from moco_d2.detection.images import check_images
from moco_d2.errors import UserError


def check_before_launch(cfg: CfgNode, args: argparse.Namespace) -> None:
    """Everything about ``cfg`` and ``args`` that can be checked without training."""
    if torch.device(cfg.MODEL.DEVICE).type == "cuda" and not torch.cuda.is_available():
        raise UserError("MODEL.DEVICE is cuda but CUDA is not available; add MODEL.DEVICE cpu")
    check_solver(cfg, args)
    check_output_dir(cfg.OUTPUT_DIR)
    check_weights(cfg, args)
    check_datasets(cfg, args)


def check_solver(cfg: CfgNode, args: argparse.Namespace) -> None:
    """What the LR scheduler and data loader would reject only once training starts."""
    solver = cfg.SOLVER
    if args.eval_only:
        return
    if solver.MAX_ITER < 1:
        raise UserError(f"SOLVER.MAX_ITER must be at least 1, got {solver.MAX_ITER}")
    if not solver.BASE_LR > 0:
        raise UserError(f"SOLVER.BASE_LR must be positive, got {solver.BASE_LR}")
    steps = list(solver.STEPS)
    if solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and steps:
        if any(b <= a for a, b in zip([0] + steps, steps)):
            raise UserError(f"SOLVER.STEPS {tuple(steps)} must be positive and strictly increasing")
        if steps[-1] >= solver.MAX_ITER:
            raise UserError(
                f"SOLVER.STEPS {tuple(steps)} must all be below SOLVER.MAX_ITER "
                f"{solver.MAX_ITER}; when shortening a run set SOLVER.STEPS too "
                '(SOLVER.STEPS "()" for no learning-rate drop)'
            )
    processes = max(args.num_gpus, 1) * max(args.num_machines, 1)
    if solver.IMS_PER_BATCH % processes:
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH} is not divisible by the "
            f"{processes} processes (--num-gpus x --num-machines)"
        )


def check_output_dir(output_dir: str) -> None:
    """OUTPUT_DIR is a writable folder, or can be created as one (nothing is created here)."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"OUTPUT_DIR {output_dir} cannot be created: {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"OUTPUT_DIR {output_dir} is not writable: no write permission on {path}")


def resume_checkpoint(output_dir: str) -> str | None:
    """The checkpoint ``--resume`` would continue from, or None when there is none."""
    try:
        with open(os.path.join(output_dir, LAST_CHECKPOINT)) as f:
            name = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return os.path.join(output_dir, name) if name else None


def check_weights(cfg: CfgNode, args: argparse.Namespace) -> None:
    """The file to load (the resume checkpoint, else MODEL.WEIGHTS, a URL fetched now rather
    than in every process) reads safely, converts, holds finite numbers, and gets its input."""
    path = resume_checkpoint(cfg.OUTPUT_DIR) if args.resume else None
    key = f"--resume ({os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)})"
    if path is None:
        path, key = cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"
    if not path:
        return  # random init on purpose
    if "://" in path:
        path = local_weights(path, key)
    if not os.path.isfile(path):
        raise UserError(
            f"{key} file not found: {path!r} (convert a pretraining checkpoint with "
            'tools/convert-to-d2.py; MODEL.WEIGHTS "" trains from random initialization '
            "on purpose)"
        )
    data = read_detectron2_file(path)
    bad = non_finite_tensor(data["model"])
    if bad:
        raise UserError(
            f"{key} {path} holds non-finite values (NaN or inf), first in tensor {bad}: the "
            "run that wrote it diverged; use weights from before the divergence"
        )
    check_input_normalisation(cfg, path, data.get(tool.NORMALISATION), key)


def check_input_normalisation(
    cfg: CfgNode, path: str, record: Any, key: str = "MODEL.WEIGHTS"
) -> None:
    """Weights that recorded the input they expect must get it: TF-trained SimCLR weights, or
    a detector trained on them, given ImageNet mean/std see other inputs than they were trained
    on, and nothing would say so. Weights without a (well-formed) record are not checked."""
    configured = input_record(cfg)
    means = ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")
    try:
        expected = {name: [float(v) for v in record[name]] for name in means}
        same = record["INPUT.FORMAT"] == configured["INPUT.FORMAT"]
    except (TypeError, KeyError, ValueError):
        return  # no record, or not one the converter wrote
    for name in means:
        same &= len(expected[name]) == len(configured[name]) and all(
            math.isclose(e, a, abs_tol=1e-3) for e, a in zip(expected[name], configured[name])
        )
    if not same:
        raise UserError(
            f"{key} {path} expects {record.get('about', 'other')} input, but the config "
            f"has {tool.config_overrides(configured)}: add {tool.config_overrides(record)}"
        )


def _registered(name: str, key: str) -> None:
    names = DatasetCatalog.list()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{key}: dataset {name!r} is not registered{hint}")


def _images_and_objects(key: str, name: str, coco: CocoSummary | None) -> tuple[int, int]:
    """Images and objects, the images checked. COCO's come from the streaming check: loading
    it here would hold the parsed file in the launcher while the workers load their own."""
    if coco is not None:
        return coco.images, coco.objects
    dicts = DatasetCatalog.get(name)
    check_images(dicts, f"{key} {name}")
    return len(dicts), sum(len(d.get("annotations") or ()) for d in dicts)


def check_datasets(cfg: CfgNode, args: argparse.Namespace) -> None:
    """Every dataset used is registered and has images (training: objects); every annotation
    is validated (as the evaluator will read it) and every image header read, once, here."""
    used = [("DATASETS.TEST", n) for n in cfg.DATASETS.TEST]
    if not args.eval_only:
        used = [("DATASETS.TRAIN", n) for n in cfg.DATASETS.TRAIN] + used
        if not cfg.DATASETS.TRAIN:
            raise UserError("DATASETS.TRAIN is empty: nothing to train on")
    for key, name in used:
        _registered(name, key)
    check_split_files([name for _, name in used])
    coco = check_coco_datasets(
        [name for _, name in used],
        masks=cfg.MODEL.MASK_ON,
        test_names=[name for key, name in used if key == "DATASETS.TEST"],
    )
    classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for key, name in used:
        summary = coco.get(name)
        if summary is not None and summary.categories != classes:
            raise UserError(
                f"{key}: dataset {name!r} has {summary.categories} categories, but "
                f"MODEL.ROI_HEADS.NUM_CLASSES is {classes}: add MODEL.ROI_HEADS.NUM_CLASSES "
                f"{summary.categories}"
            )
        images, objects = _images_and_objects(key, name, coco.get(name))
        if not images:
            raise UserError(f"{key}: dataset {name!r} has no images")
        if key == "DATASETS.TRAIN" and not objects:
            raise UserError(f"{key}: dataset {name!r} has no annotated object to train on")
        if key == "DATASETS.TEST" and not MetadataCatalog.get(name).get("evaluator_type"):
            raise UserError(f"{key}: dataset {name!r} has no evaluator_type in its metadata")
