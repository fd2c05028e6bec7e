"""Jobs on a SLURM cluster through submitit, or the same jobs on this machine through submitit's
local executor (real processes, one per task, with SLURM's preemption signal).

The two routes differ only in the executor and its parameters. A job that is preempted or
reaches its time limit gets submitit's signal; the job's ``checkpoint`` method (submitit's
``Checkpointable``) returns what to run again, and submitit requeues it: the work resumes from
its own last checkpoint.
"""

import os
import re
import shutil
from typing import Any

from moco_d2.config import ClusterFlags
from moco_d2.errors import UserError


def check_launch(args: ClusterFlags) -> None:
    """Refuse what no job could run, before anything is built or submitted."""
    if args.launch == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--launch slurm: no sbatch on this machine's PATH; submit from a SLURM login node, "
            "or use --launch local to run the same jobs here"
        )
    for item in args.slurm_param:
        if "=" not in item or not item.split("=", 1)[0]:
            raise UserError(f"--slurm-param {item!r}: expected KEY=VALUE, e.g. qos=high")


def executor(args: ClusterFlags, folder: str, tasks_per_node: int, name: str) -> Any:
    """A submitit executor for ``args.launch`` (slurm or local) with the job's shape: one task
    per process, ``tasks_per_node`` on each of ``--nodes``."""
    import submitit

    if args.launch == "local":
        if args.nodes > 1:
            raise UserError("--launch local runs on this machine: --nodes must be 1")
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(
            timeout_min=args.timeout_min, tasks_per_node=tasks_per_node,
            gpus_per_node=args.gpus, nodes=1,
        )  # fmt: skip
        return local
    slurm = submitit.SlurmExecutor(folder=folder, max_num_timeout=30)
    slurm.update_parameters(**slurm_parameters(args, tasks_per_node, name))
    return slurm


def slurm_parameters(args: ClusterFlags, tasks_per_node: int, name: str) -> dict[str, Any]:
    """The sbatch parameters of one job, as submitit's SlurmExecutor names them."""
    gpus = args.gpus
    params: dict[str, Any] = {
        "job_name": name,
        "time": args.timeout_min,
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node,
        "gpus_per_node": gpus,
        "cpus_per_task": max(1, 10 * gpus // max(tasks_per_node, 1)),
        "signal_delay_s": 120,
    }
    for key, value in (("partition", args.partition), ("account", args.account)):
        if value:
            params[key] = value
    if args.constraint:
        params["constraint"] = args.constraint
    extra = dict(item.split("=", 1) for item in args.slurm_param)
    if extra:
        params["additional_parameters"] = extra
    return params


def rendezvous(env: Any) -> str:
    """The process group's address inside a submitit job: the first node, a port from the job
    id (the same on every task, and unlikely to clash with another job on that node)."""
    job = "".join(ch for ch in str(env.job_id) if ch.isdigit()) or "0"
    return f"tcp://{env.hostnames[0]}:{20000 + int(job) % 20000}"


def job_folder(args: ClusterFlags, output_dir: str) -> str:
    return args.job_dir or os.path.join(output_dir, "jobs")


def run_task(worker: Any, config: Any) -> Any:
    """``worker(config, launch)`` as this task of the running submitit job: one rank per task,
    the process group's rendezvous taken from the job's environment."""
    import submitit

    from moco_d2.launch import run_process

    env = submitit.JobEnvironment()
    per_node = env.num_tasks // max(env.num_nodes, 1)
    return run_process(
        worker, config, env.num_tasks, env.global_rank, per_node, env.local_rank, rendezvous(env)
    )


def wait(job: Any, what: str) -> Any:
    """The job's results; a failed job is one line: its UserError, or where its log is."""
    import submitit

    try:
        return job.results()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
        said = re.findall(r"moco_d2\.errors\.\w+: (.+)", str(e))
        reason = said[-1] if said else f"see {job.paths.stderr}"
        raise UserError(f"{what} (job {job.job_id}) failed: {reason}") from None
