"""``tools/train_net.py``: fine-tune a converted backbone on VOC07+12 and evaluate on VOC07.

    tools/train_net.py --config-file configs/voc_R50_C4.yaml --num-gpus 8 MODEL.WEIGHTS moco.pkl
    tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU processes over gloo, which detectron2
0.6's launch cannot do. ``MODEL.WEIGHTS`` may also name a pretraining checkpoint, converted in
memory; ``--coco-dataset`` registers a COCO-format dataset of one's own, in every process.
"""

import argparse
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.engine.launch import _distributed_worker, _find_free_port
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from moco_d2.cli import ArgumentParser, spawn
from moco_d2.detection import compat
from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer, read_detectron2_file
from moco_d2.detection.data.coco import add_coco_dataset_argument, register_coco_datasets
from moco_d2.detection.evaluation import METRICS_FILE
from moco_d2.detection.preflight import check_before_launch, resume_checkpoint
from moco_d2.detection.trainer import Trainer
from moco_d2.errors import UserError
from moco_d2.io import remove_stale_temporaries

logger = logging.getLogger(__name__)

# This tool in a process of its own (trials, the demo), so each run starts detectron2 afresh.
COMMAND = (sys.executable, "-c", f"from moco_d2.cli import run_tool; run_tool('{__name__}')")
DEFAULT_TIMEOUT = timedelta(minutes=30)


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


def resolve_sync_bn(cfg: CfgNode) -> CfgNode:
    """``naiveSyncBN`` for ``SyncBN`` in several CPU processes, where torch's SyncBatchNorm
    refuses to run; Detectron2's NaiveSyncBatchNorm all-reduces over gloo. Returns ``cfg``."""
    on_cpu = torch.device(cfg.MODEL.DEVICE).type == "cpu"
    if cfg.MODEL.RESNETS.NORM == "SyncBN" and on_cpu and comm.get_world_size() > 1:
        cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
        logger.info(
            "MODEL.RESNETS.NORM: SyncBN -> naiveSyncBN (torch's SyncBatchNorm needs "
            "CUDA in multi-process runs; %d CPU processes)",
            comm.get_world_size(),
        )
    return cfg


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


def launch(
    main_func: Callable,
    processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    device: str = "cuda",
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Detectron2's ``launch``, also on CPU processes over gloo, and with a UserError in any
    process reported as the tools' one line and exit 2 (:func:`moco_d2.cli.spawn`)."""
    world_size = num_machines * processes_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto needs a single machine")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    worker = _cpu_worker if device == "cpu" else _distributed_worker
    group = (world_size, processes_per_machine, machine_rank, dist_url, args, timeout)
    spawn(worker, processes_per_machine, (main_func, *group))


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    """Detectron2's ``_distributed_worker`` over gloo instead of NCCL."""
    # N processes with one thread per core each would oversubscribe the CPU.
    torch.set_num_threads(max(1, torch.get_num_threads() // per_machine))
    rank = machine_rank * per_machine + local_rank
    try:
        dist.init_process_group(
            "gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
        )
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise
    compat.set_local_process_group(world_size, per_machine, machine_rank)
    comm.synchronize()
    main_func(*args)


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    register_coco_datasets(args.coco_dataset)
    cfg = load_config(args)
    if finished(cfg, args):
        return 0
    check_before_launch(cfg, args)
    remove_stale_temporaries(cfg.OUTPUT_DIR)
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=torch.device(cfg.MODEL.DEVICE).type,
    )
    return 0
