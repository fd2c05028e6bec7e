"""Where each process of a pretraining or lincls run stands: the released flags, torchrun, or
one process, resolved once into a frozen :class:`Launch`.

* one process (CPU or one GPU): nothing to start;
* ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK come from the environment (``env://``);
* ``--multiprocessing-distributed``: one process per GPU is spawned on this node
  (``--nproc-per-node`` on CPU); ``--world-size`` is then the number of nodes and ``--rank``
  this node's rank.

Whichever way, a run of one process in total (also the released one-GPU command
``--multiprocessing-distributed --world-size 1 --rank 0``) runs here without a process group, so
pretraining keeps its single-process shuffle-BN emulation. The backend is NCCL on GPU and gloo on
CPU; forming the group is bounded by ``--dist-timeout``.
"""

import contextlib
import dataclasses
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moco_d2.cli import spawn
from moco_d2.config import TrainConfig
from moco_d2.errors import UserError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# What made NCCL initialise on a one-node VM where it otherwise hung (docs/pretraining.md).
NCCL_VM_VARS = (
    "NCCL_SOCKET_IFNAME=lo NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 "
    "NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0"
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in the run."""

    world_size: int
    rank: int
    procs_per_node: int
    device: torch.device
    dist_url: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def one_process(device: torch.device | str = "cpu") -> Launch:
    """The launch of a run of one process in total on ``device`` (benchmarks, tests)."""
    return Launch(1, 0, 1, torch.device(device))


Worker = Callable[[Any, Launch], Any]  # a tool's run(config, launch)


def launch(worker: Worker, config: TrainConfig) -> None:
    """Run ``worker(config, launch)`` in every process of the run (a module-level function)."""
    if config.multiprocessing_distributed:
        nprocs = procs_per_node(config)
        if nprocs < 1:
            raise UserError("--multiprocessing-distributed: no GPU found; pass --nproc-per-node")
        nodes = max(config.world_size, 1)
        if nodes * nprocs == 1:
            return run_process(worker, config, 1, 0, 1, 0)
        url = config.dist_url
        if url == "env://" and "MASTER_ADDR" not in os.environ:
            if nodes > 1:
                raise UserError(
                    "multi-node --multiprocessing-distributed needs --dist-url tcp://HOST:PORT"
                )
            url = f"tcp://127.0.0.1:{free_port()}"
        plan = (nodes * nprocs, max(config.rank, 0) * nprocs, nprocs, url)
        spawn(_spawned, nprocs, (worker, config, plan))
        return None
    world, rank, local_rank = max(config.world_size, 1), max(config.rank, 0), None
    if all(v in os.environ for v in _TORCHRUN_VARS):
        world = config.world_size if config.world_size != -1 else int(os.environ["WORLD_SIZE"])
        rank = config.rank if config.rank != -1 else int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
    if world == 1:
        rank = 0
    return run_process(worker, config, world, rank, procs_per_node(config), local_rank)


def _spawned(local_rank: int, worker: Worker, config: TrainConfig, plan: tuple) -> None:
    world, first_rank, nprocs, url = plan
    run_process(worker, config, world, first_rank + local_rank, nprocs, local_rank, url)


def run_process(
    worker: Worker,
    config: TrainConfig,
    world: int,
    rank: int,
    nprocs: int,
    local_rank: int | None,
    url: str | None = None,
) -> Any:
    """``worker(config, launch)`` as process ``rank`` of ``world`` (joining their group)."""
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    here = Launch(world, rank, nprocs if world > 1 else 1, device, url or config.dist_url)
    if here.distributed:
        _join_group(config, here)
    try:
        return worker(config, here)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def procs_per_node(config: TrainConfig) -> int:
    """Processes on this node: those --multiprocessing-distributed spawns, torchrun's
    LOCAL_WORLD_SIZE, or 1. ``-b`` is split over them."""
    if getattr(config, "launch", "here") != "here":  # one task per GPU (or CPU process) of a job
        return config.tasks_per_node  # type: ignore[attr-defined]
    if config.multiprocessing_distributed:
        if config.nproc_per_node:
            return config.nproc_per_node
        wants_cuda = config.device.startswith("cuda") or config.device == "auto"
        return torch.cuda.device_count() if wants_cuda and torch.cuda.is_available() else 1
    if all(v in os.environ for v in _TORCHRUN_VARS):
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return 1


def _join_group(config: TrainConfig, here: Launch) -> None:
    """``init_process_group`` and a first barrier, both within ``--dist-timeout``: the TCP
    rendezvous honours the timeout itself, but NCCL connects only at the first collective and
    can block there for ever, so that barrier is waited for on a watched thread."""
    cuda = here.device.type == "cuda"
    backend = config.dist_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise UserError("--dist-backend nccl needs GPUs; use gloo on CPU")
    if here.dist_url == "env://" and "MASTER_ADDR" not in os.environ:
        raise UserError(
            "--dist-url env:// needs MASTER_ADDR/MASTER_PORT (torchrun sets them); "
            "or pass --dist-url tcp://HOST:PORT"
        )
    timeout = timedelta(seconds=config.dist_timeout)
    try:
        dist.init_process_group(
            backend, init_method=here.dist_url, world_size=here.world_size, rank=here.rank,
            timeout=timeout,
        )  # fmt: skip
        _run_within(timeout, dist.barrier, [here.device.index] if cuda else None)
    except (RuntimeError, ValueError, TimeoutError) as e:  # torch's DistError is a RuntimeError
        raise UserError(_no_group(config, here, backend, e)) from None


def _run_within(timeout: timedelta, fn: Callable, device_ids: Any) -> None:
    """``fn(device_ids=...)`` on a daemon thread; TimeoutError if it has not returned in time
    (the thread is left behind: a blocked C++ call cannot be interrupted, and the process
    exits)."""
    failure: list[BaseException] = []

    def call() -> None:
        try:
            fn(device_ids=device_ids)
        except BaseException as e:  # re-raised on the calling thread
            failure.append(e)

    thread = threading.Thread(target=call, name="dist-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout.total_seconds())
    if thread.is_alive():
        raise TimeoutError(f"no reply from every rank after {timeout.total_seconds():g} s")
    if failure:
        raise failure[0]


def _no_group(config: TrainConfig, here: Launch, backend: str, error: BaseException) -> str:
    """One line: where the rendezvous was, who this process is, why it failed, what to check."""
    address = here.dist_url
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
        f"{here.world_size}, rank {here.rank}, {backend}) within --dist-timeout "
        f"{config.dist_timeout:g} s: {reason}; {advice}"
    )


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` → torch.device; ``cuda`` picks the local rank's GPU."""
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bf16_supported(device: torch.device) -> bool:
    """CPUs always run bf16 autocast; CUDA devices only from Ampere on."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``enabled`` (callers check :func:`bf16_supported` once), else none."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient), rank order."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)
