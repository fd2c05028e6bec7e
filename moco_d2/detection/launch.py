"""Detectron2's ``launch`` for GPUs, plus the same on CPU processes over gloo.

detectron2 0.6's launch asserts CUDA and uses NCCL, so on a CPU-only machine
``--num-gpus N`` with ``MODEL.DEVICE cpu`` starts N processes here instead.
"""

import dataclasses
import logging
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

from moco_d2.detection import compat

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    device: str = "cuda",
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in each process; GPU runs go to detectron2's launch."""
    world_size = num_machines * num_processes_per_machine
    if device != "cpu" or world_size == 1:
        return d2_launch(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto needs a single machine")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    group = _CpuGroup(world_size, num_processes_per_machine, machine_rank, dist_url, timeout)
    mp.spawn(
        _cpu_worker, nprocs=num_processes_per_machine, daemon=False, args=(group, main_func, args)
    )


@dataclasses.dataclass(frozen=True)
class _CpuGroup:
    """Where a spawned CPU process stands in the gloo group."""

    world_size: int
    processes_per_machine: int
    machine_rank: int
    dist_url: str
    timeout: timedelta


def _cpu_worker(local_rank: int, group: _CpuGroup, main_func: Callable, args: tuple) -> None:
    rank = group.machine_rank * group.processes_per_machine + local_rank
    # N processes with one thread per core each would oversubscribe the CPU.
    torch.set_num_threads(max(1, torch.get_num_threads() // group.processes_per_machine))
    try:
        dist.init_process_group(
            "gloo",
            init_method=group.dist_url,
            world_size=group.world_size,
            rank=rank,
            timeout=group.timeout,
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: %s", group.dist_url)
        raise
    compat.set_local_process_group(
        group.world_size, group.processes_per_machine, group.machine_rank
    )
    comm.synchronize()
    main_func(*args)
