"""Pretraining as one submitit job (``--launch slurm`` or ``local``): ``--nodes`` × tasks per node,
one rank per task, that survives preemption and time limits.

On submitit's signal, rank 0's :meth:`PretrainJob.checkpoint` asks for the same run again with
``--resume`` on its output folder; the requeued job continues from the last epoch's checkpoint,
where a resume is exact, so the run ends as if nothing had happened.
"""

import dataclasses
import os
from typing import Any

import submitit

from moco_d2 import cluster, io
from moco_d2.pretrain.config import PretrainConfig


class PretrainJob(submitit.helpers.Checkpointable):
    def __call__(self, config: PretrainConfig) -> None:
        from moco_d2.pretrain.main import run

        cluster.run_task(run, config)

    def checkpoint(self, config: PretrainConfig) -> submitit.helpers.DelayedSubmission:
        out = config.output_dir
        saved = os.path.isdir(out) and io.latest_checkpoint(out) is not None
        resumed = dataclasses.replace(config, resume=out) if saved else config
        return submitit.helpers.DelayedSubmission(PretrainJob(), resumed)


def submit(config: PretrainConfig) -> Any:
    """Submit the run as one job of ``--nodes`` × (``--gpus-per-node``, or ``--nproc-per-node``
    CPU processes) tasks; return submitit's job."""
    cluster.check_launch(config)
    folder = cluster.job_folder(config, config.output_dir)
    executor = cluster.executor(config, folder, config.tasks_per_node, name="moco_pretrain")
    return executor.submit(PretrainJob(), config)


def main(config: PretrainConfig) -> int:
    """Submit; wait for a local job, or say where a SLURM job's logs are."""
    job = submit(config)
    if config.launch == "slurm":
        print(f"submitted job {job.job_id}; logs in {job.paths.folder}")
        return 0
    cluster.wait(job, "pretraining")
    return 0
