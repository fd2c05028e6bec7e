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

The backend defaults to NCCL on GPU and gloo on CPU. Forming the process group is bounded by
``--dist-timeout``; a :class:`UserError` in a spawned worker reaches the launching process as
itself, so every launch mode reports bad input and divergence as one line.
"""

import argparse
import os
import socket
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_d2.errors import UserError
from moco_d2.training.cli_args import positive_float, positive_int

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# torch's and Detectron2's own default. It bounds every collective too, and ranks wait in one
# while rank 0 alone runs the kNN monitor or writes a checkpoint, so it must outlast those.
DEFAULT_DIST_TIMEOUT_S = 1800
# What made NCCL initialise on a one-node VM where it otherwise hung (docs/pretraining.md).
NCCL_VM_VARS = (
    "NCCL_SOCKET_IFNAME=lo NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 "
    "NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0"
)


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
        "--dist-timeout",
        default=DEFAULT_DIST_TIMEOUT_S,
        type=positive_float,
        metavar="SECONDS",
        help="stop when the process group has not formed after this long; also the limit of "
        f"every collective (default: {DEFAULT_DIST_TIMEOUT_S})",
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
        _spawn(worker, args, nprocs)
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


def _spawn(worker: Callable, args: argparse.Namespace, nprocs: int) -> None:
    """``mp.spawn`` whose workers' :class:`UserError` is raised here as itself (one line through
    :func:`moco_d2.cli.run_tool`) instead of as mp.spawn's traceback of the worker."""
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_spawned, nprocs=nprocs, args=(worker, args, errors))
    except mp.ProcessExitedException:
        if errors.empty():
            raise
        raise errors.get() from None


def _spawned(local_rank: int, worker: Callable, args: argparse.Namespace, errors: Any) -> None:
    args.rank = args.node_rank * args.nproc_per_node + local_rank
    try:
        worker(local_rank, args)
    except UserError as e:
        errors.put(e)
        sys.exit(2)


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
    _join_group(args, backend, device)
    return device


def _join_group(args: argparse.Namespace, backend: str, device: torch.device) -> None:
    """``init_process_group`` and a first barrier, both within ``--dist-timeout``: the TCP
    rendezvous honours the timeout itself, but NCCL connects only at the first collective and
    can block there for ever, so that barrier is waited for on a watched thread."""
    timeout = timedelta(seconds=args.dist_timeout)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=args.dist_url,
            world_size=args.world_size,
            rank=args.rank,
            timeout=timeout,
        )
        _run_within(timeout, _first_barrier, device)
    except (RuntimeError, ValueError, TimeoutError) as e:  # torch's DistError is a RuntimeError
        raise UserError(_no_group(args, backend, e)) from None


def _first_barrier(device: torch.device) -> None:
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _run_within(timeout: timedelta, fn: Callable, *fn_args: Any) -> None:
    """``fn(*fn_args)`` on a daemon thread; TimeoutError if it has not returned in time (the
    thread is left behind: a blocked C++ call cannot be interrupted, and the process exits)."""
    failure: list[BaseException] = []

    def call() -> None:
        try:
            fn(*fn_args)
        except BaseException as e:  # re-raised on the calling thread
            failure.append(e)

    thread = threading.Thread(target=call, name="dist-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout.total_seconds())
    if thread.is_alive():
        raise TimeoutError(f"no reply from every rank after {timeout.total_seconds():g} s")
    if failure:
        raise failure[0]


def _no_group(args: argparse.Namespace, backend: str, error: BaseException) -> str:
    """One line: where the rendezvous was, who this process is, why it failed, what to check."""
    address = args.dist_url
    if address == "env://":
        address += f" ({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
    lines = str(error).strip().splitlines()
    reason = lines[0].rstrip(".") if lines else type(error).__name__
    advice = (
        "check that every other rank started with the same --dist-url and --world-size and "
        "that this address and port are reachable from here"
    )
    if backend == "nccl":
        advice += f"; for NCCL on one node of a VM, try the variables {NCCL_VM_VARS}"
    return (
        f"could not form the process group at --dist-url {address} (world size "
        f"{args.world_size}, rank {args.rank}, {backend}) within --dist-timeout "
        f"{args.dist_timeout:g} s: {reason}; {advice}"
    )


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
