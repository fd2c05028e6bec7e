"""Detectron2's ``launch`` for GPUs, plus the same on CPU processes over gloo.

detectron2 0.6's launch asserts CUDA and uses NCCL, so on a CPU-only machine
``--num-gpus N`` with ``MODEL.DEVICE cpu`` starts N processes here instead.

A :class:`UserError` in a started process is printed by that process as the tools' one line
(``error: ...``), and the launcher exits 2, instead of ``mp.spawn`` reporting it as a
traceback.
"""

import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

from moco_d2.detection import compat
from moco_d2.errors import UserError

DEFAULT_TIMEOUT = timedelta(minutes=30)
USER_ERROR_EXIT = 2  # run_tool's exit status for a UserError
# How long a rank other than 0 waits, after an EveryRankError, for rank 0 to report it and the
# launcher to end the other processes, before it reports the error itself.
REPORT_GRACE = timedelta(seconds=60)


class EveryRankError(UserError):
    """A :class:`UserError` that every process meets alike (e.g. divergence, the weights being
    the same everywhere); only rank 0 prints it."""


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
    if world_size > 1:
        main_func = functools.partial(_report_user_errors, main_func)
        # mp.spawn logs each process it ends after another failed; the error line suffices.
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        if device != "cpu" or world_size == 1:
            d2_launch(
                main_func,
                num_processes_per_machine,
                num_machines=num_machines,
                machine_rank=machine_rank,
                dist_url=dist_url,
                args=args,
                timeout=timeout,
            )
            return
        if dist_url == "auto":
            if num_machines != 1:
                raise ValueError("dist_url=auto needs a single machine")
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
        group = _CpuGroup(world_size, num_processes_per_machine, machine_rank, dist_url, timeout)
        mp.spawn(
            _cpu_worker,
            nprocs=num_processes_per_machine,
            daemon=False,
            args=(group, main_func, args),
        )
    except mp.ProcessExitedException as e:
        if e.exit_code != USER_ERROR_EXIT:
            raise
        raise SystemExit(USER_ERROR_EXIT) from None  # the process printed its error line


def _report_user_errors(main_func: Callable, *args) -> None:
    try:
        main_func(*args)
    except UserError as e:
        if isinstance(e, EveryRankError) and comm.get_rank() != 0:
            time.sleep(REPORT_GRACE.total_seconds())
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


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
