"""Process setup for training tools: the released flags, torchrun, and per-device spawning.

Three ways to launch, as in the released MoCo code plus torchrun:

* one process (CPU or one GPU): nothing to do;
* ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK come from the environment (``env://``);
* ``--multiprocessing-distributed``: this process spawns one worker per GPU (``--nproc-per-node``
  on CPU); ``--world-size`` is then the number of nodes and ``--rank`` this node's rank.

Whichever way, a run of one process in total (the released one-GPU command
``--multiprocessing-distributed --world-size 1 --rank 0`` on a one-GPU node, torchrun with
WORLD_SIZE=1) runs here, without spawning and without a process group: ``args.distributed`` is
False, so callers skip DDP and pretraining keeps its single-process shuffle-BN emulation.

The backend defaults to NCCL on GPU and gloo on CPU.
"""

import argparse
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_d2.errors import UserError
from moco_d2.training.cli_args import positive_int

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The released launch flags plus ``--device`` and ``--nproc-per-node``."""
    group = parser.add_argument_group("distributed")
    group.add_argument(
        "--world-size",
        default=-1,
        type=int,
        help="number of nodes with --multiprocessing-distributed, else number of "
        "processes (default: from torchrun, or 1)",
    )
    group.add_argument(
        "--rank",
        default=-1,
        type=int,
        help="node rank with --multiprocessing-distributed, else process rank",
    )
    group.add_argument(
        "--dist-url",
        default="env://",
        type=str,
        help="init method, e.g. tcp://HOST:PORT (default env://, as torchrun sets)",
    )
    group.add_argument(
        "--dist-backend",
        default=None,
        choices=["nccl", "gloo"],
        help="default: nccl on GPU, gloo on CPU",
    )
    group.add_argument(
        "--multiprocessing-distributed",
        action="store_true",
        help="spawn one process per GPU on this node (the released 8-GPU launch)",
    )
    group.add_argument(
        "--nproc-per-node",
        default=None,
        type=positive_int,
        help="processes spawned by --multiprocessing-distributed "
        "(default: number of GPUs, 1 on CPU)",
    )
    group.add_argument(
        "--device", default="auto", help="auto (GPU when available), cpu, cuda or cuda:N"
    )
    return group


def launch(
    worker: Callable[[int | None, argparse.Namespace], Any], args: argparse.Namespace
) -> Any:
    """Run ``worker(local_rank, args)`` here, or spawned with --multiprocessing-distributed.

    ``worker`` must be a module-level function; it should call :func:`init_process` first.
    """
    if args.multiprocessing_distributed:
        nprocs = procs_per_node(args)
        if nprocs < 1:
            raise UserError("--multiprocessing-distributed: no GPU found; pass --nproc-per-node")
        nodes = max(args.world_size, 1)
        args.node_rank = max(args.rank, 0)
        args.nproc_per_node = nprocs
        args.world_size = nodes * nprocs
        if args.world_size == 1:
            return worker(0, one_process(args))
        args.distributed = True
        if args.dist_url == "env://" and "MASTER_ADDR" not in os.environ:
            if nodes > 1:
                raise UserError(
                    "multi-node --multiprocessing-distributed needs --dist-url tcp://HOST:PORT"
                )
            args.dist_url = f"tcp://127.0.0.1:{free_port()}"
        mp.spawn(_spawned, nprocs=nprocs, args=(worker, args))
        return None
    if all(v in os.environ for v in _TORCHRUN_VARS):
        if args.world_size == -1:
            args.world_size = int(os.environ["WORLD_SIZE"])
        if args.rank == -1:
            args.rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
    else:
        local_rank = None
    args.world_size = max(args.world_size, 1)
    if args.world_size == 1:
        return worker(local_rank, one_process(args))
    args.rank = max(args.rank, 0)
    args.distributed = True
    return worker(local_rank, args)


def one_process(args: argparse.Namespace) -> argparse.Namespace:
    """Mark ``args`` as a run of one process in total (rank 0, no process group); return it."""
    args.world_size = 1
    args.rank = 0
    args.distributed = False
    return args


def procs_per_node(args: argparse.Namespace) -> int:
    """Processes on this node, before or after :func:`launch`: those --multiprocessing-distributed
    spawns, torchrun's LOCAL_WORLD_SIZE, or 1. ``-b`` is split over them."""
    if args.multiprocessing_distributed:
        if args.nproc_per_node:
            return args.nproc_per_node
        return torch.cuda.device_count() if _wants_cuda(args.device) else 1
    if all(v in os.environ for v in _TORCHRUN_VARS):
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return 1


def _spawned(local_rank: int, worker: Callable, args: argparse.Namespace) -> None:
    args.rank = args.node_rank * args.nproc_per_node + local_rank
    worker(local_rank, args)


def init_process(local_rank: int | None, args: argparse.Namespace) -> torch.device:
    """Pick this process's device and join the process group when distributed; return the device."""
    device = resolve_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not args.distributed:
        return device
    backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError("--dist-backend nccl needs GPUs; use gloo on CPU")
    if args.dist_url == "env://" and "MASTER_ADDR" not in os.environ:
        raise UserError(
            "--dist-url env:// needs MASTER_ADDR/MASTER_PORT (torchrun sets them); "
            "or pass --dist-url tcp://HOST:PORT"
        )
    dist.init_process_group(
        backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank
    )
    return device


def resolve_device(spec: str | None, local_rank: int | None = None) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` → torch.device; ``cuda`` picks the local rank's GPU."""
    spec = spec or "auto"
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
    return device


def _wants_cuda(spec: str | None) -> bool:
    return (spec in (None, "auto") and torch.cuda.is_available()) or str(spec).startswith("cuda")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient), rank order."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
