"""`tools/run_trials.py`: N detection trials per backbone, then the comparison report.

Each backbone (``--weights NAME=PATH``, or the config's own ``MODEL.WEIGHTS`` as one unnamed
row) gets ``--num-trials`` fine-tunings with seeds ``--first-seed + k`` under ``OUT/NAME/trial_k``:
a trial with its metrics file is done, one with a checkpoint is resumed, so the same command
finishes a half-done set. A row's trials never mix with other settings: its fingerprint (the
weights' sha256, the merged config but OUTPUT_DIR and SEED, and each dataset's annotations and
images' names and sizes, :func:`dataset_fingerprint`) is written first to
``OUT/NAME/trials_fingerprint.json``, and a rerun that differs from it is refused unless
``--restart``. ``OUT/comparison.{json,md,png}`` is rewritten as trials finish.

Trials run one after another here, or as submitit jobs (``--launch slurm``: all submitted at
once; ``--launch local``: at most ``--max-parallel`` at a time on this machine). A job that is
preempted or reaches its time limit is requeued and resumes its trial from the trial's last
checkpoint (:class:`TrialJob`).
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import submitit

from moco_d2.cli import ArgumentParser, positive_int
from moco_d2.config import ClusterFlags
from moco_d2.errors import UserError
from moco_d2.io import atomic_write_json, remove_stale_temporaries, sha256_of
from moco_d2.published import VOC_DETECTION
from moco_d2.trials import compare

logger = logging.getLogger("moco_d2.trials")

FINGERPRINT_JSON = "trials_fingerprint.json"
JOB_JSON = "job.json"  # the submitit job of a trial, so that a rerun waits for it
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
RANDOM_INIT = "none"


@dataclass(frozen=True)
class Settings:
    """The command line, parsed once."""

    config_file: str
    output_dir: str
    weights: tuple[str, ...]
    num_trials: int
    first_seed: int
    num_gpus: int
    reference: tuple[str, ...]
    all_pairs: bool
    restart: bool
    max_parallel: int
    no_wait: bool
    coco_dataset: tuple[tuple[str, str, str], ...]
    opts: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    """One backbone: its name, weights (a path, or "" for random init) and trials' folder."""

    name: str
    weights: str
    directory: str


@dataclass(frozen=True)
class Trial:
    """What one trial runs: ``train_net`` on ``config_file`` with ``opts``, into ``directory``."""

    config_file: str
    directory: str
    seed: int
    num_gpus: int
    opts: tuple[str, ...]
    coco_datasets: tuple[tuple[str, str, str], ...] = ()

    def command(self, machines: Sequence[str] = ()) -> list[str]:
        from moco_d2.detection.train_net import COMMAND

        resume = os.path.isfile(os.path.join(self.directory, "last_checkpoint"))
        command = [*COMMAND, "--config-file", self.config_file, "--num-gpus", str(self.num_gpus)]
        command += ["--resume"] if resume else []
        command += [part for dataset in self.coco_datasets for part in ("--coco-dataset", *dataset)]
        command += list(machines) + list(self.opts)
        return command + ["OUTPUT_DIR", self.directory, "SEED", str(self.seed)]

    def done(self) -> bool:
        return metrics_path(self.directory) is not None


def metrics_path(directory: str) -> str | None:
    """The metrics file a finished trial wrote (VOC or COCO), or None."""
    from moco_d2.detection.evaluation import METRICS_FILES

    for name in METRICS_FILES.values():
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def read_trial(path: str) -> dict[str, Any]:
    """The test dataset's block of one trial's metrics file: AP, AP50, AP75 (COCO: to APl),
    VOC's per-class values and COCO's ``segm`` block; an undefined metric is None."""
    from moco_d2.detection.evaluation import COCO_METRIC_NAMES, METRIC_NAMES

    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read trial metrics {path}: {e}") from None
    if not isinstance(metrics, dict) or len(metrics) != 1:
        raise UserError(f"{path}: expected the metrics of one test dataset")
    (block,) = metrics.values()
    names = COCO_METRIC_NAMES if "APs" in block else METRIC_NAMES
    for values in [block] + ([block["segm"]] if "segm" in block else []):
        bad = [m for m in names if m not in values or not _is_metric(values[m])]
        if bad:
            raise UserError(f"{path}: missing or bad metric {bad[0]!r}")
    return block


def _is_metric(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


# Running a trial: here, or as a submitit job.


def run_here(trial: Trial) -> None:
    """One trial in its own process (fresh detectron2 state per trial)."""
    resume = os.path.isfile(os.path.join(trial.directory, "last_checkpoint"))
    how = "resuming" if resume else "starting"
    logger.info("%s trial in %s (seed %d)", how, trial.directory, trial.seed)
    if subprocess.run(trial.command()).returncode != 0:
        raise UserError(f"trial in {trial.directory} failed (see its log.txt); rerun to resume it")


class TrialJob(submitit.helpers.Checkpointable):
    """A trial as a submitit job: ``train_net`` as a child process (one task per node, which
    starts the node's GPU processes itself). On preemption or the time limit, rank 0 stops the
    child and asks for the same trial again; it resumes from the trial's last checkpoint."""

    def __call__(self, trial: Trial) -> str:
        from moco_d2.cluster import rendezvous

        env = submitit.JobEnvironment()
        machines: list[str] = []
        if env.num_nodes > 1:
            machines = ["--num-machines", str(env.num_nodes), "--machine-rank", str(env.node)]
            machines += ["--dist-url", rendezvous(env)]
        self.child = subprocess.Popen(trial.command(machines))
        if self.child.wait() != 0:
            raise RuntimeError(f"trial in {trial.directory} failed (see its log.txt)")
        return str(metrics_path(trial.directory))

    def checkpoint(self, trial: Trial) -> Any:
        child = getattr(self, "child", None)
        if child is not None and child.returncode is None:
            # Called from the signal handler while __call__ waits on the child, holding its
            # Popen's lock: stop and reap it with the plain calls. Its checkpoints are written
            # atomically, so the last complete one is what the requeued trial resumes from.
            os.kill(child.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
        return submitit.helpers.DelayedSubmission(TrialJob(), trial)


def run_jobs(
    trials: list[Trial], cluster: ClusterFlags, args: Settings, on_done: Callable[[], Any]
) -> None:
    """Run ``trials`` as submitit jobs, ``on_done()`` after each one finishes; with
    ``--no-wait``, return once they are submitted."""
    from moco_d2 import cluster as submit

    folder = submit.job_folder(cluster, args.output_dir)
    executor = submit.executor(cluster, folder, tasks_per_node=1, name="moco_d2_trial")
    waiting: list[tuple[Trial, Any]] = []
    queue = list(trials)
    limit = args.max_parallel if cluster.launch == "local" else len(trials)
    finished = 0
    while queue or waiting:
        while queue and len(waiting) < limit:
            trial = queue.pop(0)
            waiting.append((trial, _job_of(trial, executor, folder, cluster)))
        if args.no_wait:
            for trial, job in waiting:
                print(f"trial {trial.directory}: job {job.job_id}")
            return
        time.sleep(2)
        for trial, job in [(t, j) for t, j in waiting if j.done()]:
            waiting.remove((trial, job))
            submit.wait(job, f"trial in {trial.directory}")
            finished += 1
            logger.info("%d of %d trials finished (%s)", finished, len(trials), trial.directory)
            on_done()


def _job_of(trial: Trial, executor: Any, folder: str, cluster: ClusterFlags) -> Any:
    """The trial's job: the one a ``--no-wait`` run submitted, while it runs; else a new one."""
    record = os.path.join(trial.directory, JOB_JSON)
    if cluster.launch == "slurm" and os.path.isfile(record):
        with open(record) as f:
            earlier: Any = submitit.SlurmJob(folder=folder, job_id=json.load(f)["job_id"])
        if not earlier.done():
            return earlier
    job = executor.submit(TrialJob(), trial)
    os.makedirs(trial.directory, exist_ok=True)
    atomic_write_json({"job_id": job.job_id, "launch": cluster.launch}, record)
    logger.info("trial in %s: job %s", trial.directory, job.job_id)
    return job


# The set: rows, fingerprints, and the report.


def parse_rows(args: Settings) -> list[Row]:
    """``--weights NAME=PATH`` rows, or one unnamed row for the overrides' MODEL.WEIGHTS."""
    if not args.weights:
        return [Row("", "", args.output_dir)]
    if "MODEL.WEIGHTS" in args.opts[::2]:
        raise UserError("give the weights either as --weights NAME=PATH or as MODEL.WEIGHTS")
    rows: list[Row] = []
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or not NAME.fullmatch(name):
            raise UserError(
                f"--weights {item!r}: expected NAME=PATH, NAME of letters, digits and _.+- "
                "(it names the row and its folder), PATH a weights file or 'none'"
            )
        if name in (r.name for r in rows):
            raise UserError(f"--weights: two rows are named {name!r}")
        if path != RANDOM_INIT:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise UserError(f"--weights {name}: no readable file {path!r}")
        weights = "" if path == RANDOM_INIT else path
        rows.append(Row(name, weights, os.path.join(args.output_dir, name)))
    return rows


def fingerprint(config_file: str, opts: Sequence[str]) -> dict[str, Any]:
    """What makes two sets of trials comparable: the weights' content, every config value but
    OUTPUT_DIR and SEED (which differ per trial by design), and the datasets."""
    import yaml

    from moco_d2.detection.train_net import load_config

    cfg = load_config(argparse.Namespace(config_file=config_file, opts=list(opts)))
    config = yaml.safe_load(cfg.dump())
    config.pop("OUTPUT_DIR", None)
    config.pop("SEED", None)
    weights = cfg.MODEL.WEIGHTS
    weights_id: str | None = weights or None
    if weights and "://" not in weights:
        if not os.path.isfile(weights):
            raise UserError(f"MODEL.WEIGHTS file not found: {weights!r}")
        weights_id = sha256_of(weights)
    return {"weights_sha256": weights_id, "config": config, "datasets": dataset_identity(cfg)}


def dataset_fingerprint(name: str) -> dict[str, str] | None:
    """What identifies a registered dataset's data, at a cost a full COCO or VOC tree allows:
    the sha256 of its annotations (VOC: the split file and every listed image's XML; COCO: the
    JSON file) and of its images' names and byte sizes (not their pixels). None for a name
    that is not registered (train_net refuses it)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from moco_d2.detection.data.coco import check_coco_tree
    from moco_d2.detection.data.voc import annotation_file, image_file, read_split, split_file

    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    annotations, images = hashlib.sha256(), hashlib.sha256()
    if meta.get("evaluator_type") == "pascal_voc":
        ids = read_split(meta.dirname, meta.split)
        files = [split_file(meta.dirname, meta.split)]
        files += [annotation_file(meta.dirname, i) for i in ids]
        pictures = [image_file(meta.dirname, i) for i in ids]
    elif meta.get("json_file"):
        check_coco_tree(meta.image_root, meta.json_file)
        files = [meta.json_file]
        pictures = sorted(e.path for e in os.scandir(meta.image_root) if e.is_file())
    else:
        return None
    for path in files:
        annotations.update(_read_bytes(path))
    for path in pictures:
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        images.update(f"{os.path.basename(path)}\0{size}\n".encode())
    return {"annotations": annotations.hexdigest(), "images": images.hexdigest()}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def dataset_identity(cfg: Any) -> dict[str, dict[str, dict[str, str] | None]]:
    """Each DATASETS.TRAIN/TEST name's :func:`dataset_fingerprint`: the same names on another
    DETECTRON2_DATASETS tree, or another image folder, with other images or boxes, are other
    trials."""
    return {
        key.lower(): {name: dataset_fingerprint(name) for name in names}
        for key, names in (("TRAIN", cfg.DATASETS.TRAIN), ("TEST", cfg.DATASETS.TEST))
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


def claim_output_dir(output_dir: str, current: dict[str, Any], restart: bool) -> None:
    """Record ``current`` as the row's fingerprint, refusing to mix with other trials."""
    path = os.path.join(output_dir, FINGERPRINT_JSON)
    trials = [d for d in sorted(os.listdir(output_dir)) if d.startswith("trial_")] if (
        os.path.isdir(output_dir)
    ) else []  # fmt: skip
    if restart:
        for name in trials:
            shutil.rmtree(os.path.join(output_dir, name))
        if os.path.exists(path):
            os.remove(path)
        trials = []
    fix = "use a new --output-dir, or --restart to discard the earlier trials"
    if os.path.isfile(path):
        with open(path) as f:
            try:
                earlier = json.load(f)
            except ValueError:
                earlier = None
        if isinstance(earlier, dict) and "datasets" not in earlier:
            raise UserError(
                f"{output_dir} holds trials fingerprinted without their datasets (an older "
                f"version; see {path}), so they cannot be told apart from trials on other "
                f"data: {fix}"
            )
        if earlier != json.loads(json.dumps(current)):
            changed = (
                _differences(earlier, current) if isinstance(earlier, dict) else ["unreadable"]
            )
            raise UserError(
                f"{output_dir} holds trials of other settings ({', '.join(changed[:5])} "
                f"differ{', …' if len(changed) > 5 else ''}; see {path}): {fix}"
            )
        return
    if trials:
        raise UserError(
            f"{output_dir} holds trials ({', '.join(trials)}) without a {FINGERPRINT_JSON}, so "
            f"they cannot be told apart from this run: {fix}"
        )
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(current, path)


def report(
    args: Settings, rows: list[Row], fingerprints: list[str], trials: list[list[Trial]]
) -> dict:
    """Rewrite ``OUT/comparison.{json,md,png}`` from every trial finished so far."""
    made = []
    for row, print_, row_trials in zip(rows, fingerprints, trials):
        done = [read_trial(p) for t in row_trials if (p := metrics_path(t.directory))]
        name = row.name or os.path.basename(os.path.normpath(args.output_dir))
        made.append(compare.make_row(name, row.weights or "none", print_, done))
    return compare.write_report(args.output_dir, made, args.reference, args.all_pairs)


def run_trials(args: Settings, cluster: ClusterFlags) -> dict:
    """Finish every row's trials (here, or as jobs) and write the comparison; return it."""
    from moco_d2.detection.data.coco import register_coco_datasets

    rows = parse_rows(args)
    if cluster.launch != "here":
        from moco_d2.cluster import check_launch

        check_launch(cluster)
    register_coco_datasets(args.coco_dataset)
    fingerprints, trials = [], []
    for row in rows:
        opts = list(args.opts) + (["MODEL.WEIGHTS", row.weights] if args.weights else [])
        current = fingerprint(args.config_file, opts)
        claim_output_dir(row.directory, current, args.restart)
        remove_stale_temporaries(row.directory)
        fingerprints.append(hash_of(current))
        trials.append([
            Trial(args.config_file, os.path.join(row.directory, f"trial_{k}"),
                  args.first_seed + k, args.num_gpus, tuple(opts), args.coco_dataset)
            for k in range(args.num_trials)
        ])  # fmt: skip
    todo = [t for row_trials in trials for t in row_trials if not t.done()]
    for trial in (t for row_trials in trials for t in row_trials if t.done()):
        logger.info("trial in %s already done", trial.directory)  # on stdout, as detectron2 logs
    if todo and cluster.launch == "here":
        for trial in todo:
            run_here(trial)
            report(args, rows, fingerprints, trials)
    elif todo:
        run_jobs(todo, cluster, args, lambda: report(args, rows, fingerprints, trials))
    return report(args, rows, fingerprints, trials)


def hash_of(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def parse_args(argv: list[str]) -> tuple[Settings, ClusterFlags]:
    from moco_d2.detection.data.coco import add_coco_dataset_argument

    parser = ArgumentParser(
        prog="run_trials.py",
        description="Fine-tune and evaluate each backbone N times with different seeds; report "
        "mean ± std per backbone and whether one beats another beyond the trials' spread "
        "(Welch's 95%% interval); rerun to resume a half-done set.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--weights", action="append", default=[], metavar="NAME=PATH",
        help="a backbone to compare (repeatable): PATH is any file the converter reads, or "
        "'none' for random initialization; its trials go to OUT/NAME/",
    )  # fmt: skip
    parser.add_argument("--num-trials", type=positive_int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="trial k uses SEED first+k")
    parser.add_argument("--num-gpus", type=positive_int, default=1, help="per trial")
    parser.add_argument("--output-dir", required=True, help="OUT: rows' trials and the report")
    parser.add_argument(
        "--reference", action="append", choices=sorted(VOC_DETECTION), default=[],
        help="a published VOC07+12 row to print beside (repeatable; default: MoCo v2 200ep)",
    )  # fmt: skip
    parser.add_argument(
        "--all-pairs", action="store_true",
        help="a verdict for every pair of rows, not only the first row against each other",
    )  # fmt: skip
    parser.add_argument(
        "--restart", action="store_true", help="delete the rows' earlier trials, start over"
    )
    parser.add_argument(
        "--max-parallel", type=positive_int, default=1,
        help="--launch local: trials running at once (default 1, so that trials never share "
        "GPUs by accident)",
    )  # fmt: skip
    parser.add_argument(
        "--no-wait", action="store_true",
        help="--launch slurm: return once every trial is submitted; a rerun collects",
    )  # fmt: skip
    add_coco_dataset_argument(parser)
    ClusterFlags.add_arguments(parser)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER,
        help="config overrides for every trial, e.g. MODEL.WEIGHTS w.pkl (one unnamed row)",
    )  # fmt: skip
    ns = parser.parse_args(argv)
    if not os.path.isfile(ns.config_file):
        raise UserError(f"config file not found: {ns.config_file}")
    cluster = ClusterFlags.from_args(ns)
    if ns.no_wait and cluster.launch != "slurm":
        raise UserError("--no-wait goes with --launch slurm (local jobs end with this command)")
    settings = Settings(
        ns.config_file, ns.output_dir, tuple(ns.weights), ns.num_trials, ns.first_seed,
        ns.num_gpus, tuple(ns.reference or ["MoCo v2 200ep"]), ns.all_pairs, ns.restart,
        ns.max_parallel, ns.no_wait, tuple(tuple(d) for d in ns.coco_dataset), tuple(ns.opts),
    )  # fmt: skip
    return settings, cluster


def main(argv: list[str]) -> int:
    from detectron2.utils.logger import setup_logger

    args, cluster = parse_args(argv)
    setup_logger(name="moco_d2")
    result = run_trials(args, cluster)
    print(compare.markdown(result), end="")
    base = os.path.join(args.output_dir, compare.COMPARISON)
    print(f"comparison written to {base}.json, .md and .png")
    return 0
