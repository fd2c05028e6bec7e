"""Repeat the detection transfer with different seeds and report mean ± std, as the paper does.

The MoCo papers report VOC detection as the mean of 5 trials (std about 0.2 AP). Each trial
is a separate ``train_net`` process writing to ``OUTPUT/trial_<k>``; a trial whose metrics
file exists is done, one with a checkpoint but no metrics is resumed, so rerunning the same
command finishes a half-done set instead of starting over.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys

from moco_d2.detection.trainer import METRICS_FILE
from moco_d2.errors import UserError
from moco_d2.published import VOC_DETECTION
from moco_d2.utils.fileio import atomic_write_text

logger = logging.getLogger("moco_d2.detection.trials")

METRIC_NAMES = ("AP", "AP50", "AP75")
SUMMARY_JSON = "trials_summary.json"
SUMMARY_MD = "trials_summary.md"


def trial_dir(output_dir, index):
    return os.path.join(output_dir, f"trial_{index}")


def read_trial_metrics(path):
    """``{"AP", "AP50", "AP75"}`` of the (single) test dataset in one trial's metrics file."""
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read trial metrics {path}: {e}") from None
    if len(metrics) != 1:
        raise UserError(f"{path}: expected one test dataset, found {sorted(metrics)}")
    (values,) = metrics.values()
    return {name: float(values[name]) for name in METRIC_NAMES}


def run_trial(config_file, output_dir, seed, num_gpus, opts):
    """One fine-tuning + evaluation in its own process (fresh detectron2 state per trial)."""
    resume = os.path.isfile(os.path.join(output_dir, "last_checkpoint"))
    command = [
        sys.executable,
        "-m",
        "moco_d2.detection",
        "--config-file",
        config_file,
        "--num-gpus",
        str(num_gpus),
    ]
    command += ["--resume"] if resume else []
    command += list(opts) + ["OUTPUT_DIR", output_dir, "SEED", str(seed)]
    logger.info("%s trial in %s (seed %d)", "resuming" if resume else "starting", output_dir, seed)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"trial in {output_dir} failed (see its log.txt); rerun to resume it")


def summarize(per_trial):
    """Mean and sample standard deviation (n-1) of each metric over trials."""
    summary = {}
    for name in METRIC_NAMES:
        values = [trial[name] for trial in per_trial]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = {"mean": statistics.fmean(values), "std": std}
    return summary


def format_markdown(per_trial, summary, reference):
    lines = ["| run | AP | AP50 | AP75 |", "|---|---|---|---|"]
    for index, trial in enumerate(per_trial):
        lines.append(
            f"| trial {index} | " + " | ".join(f"{trial[m]:.2f}" for m in METRIC_NAMES) + " |"
        )
    lines.append(
        f"| **mean ± std ({len(per_trial)} trials)** | "
        + " | ".join(
            f"**{summary[m]['mean']:.2f} ± {summary[m]['std']:.2f}**" for m in METRIC_NAMES
        )
        + " |"
    )
    if reference:
        published = VOC_DETECTION[reference]
        lines.append(
            f"| published: {reference} (5 trials) | "
            + " | ".join(f"{published[m]:.1f}" for m in METRIC_NAMES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def run_trials(
    config_file, output_dir, num_trials, first_seed=0, num_gpus=1, opts=(), reference=None
):
    """Run (or finish) ``num_trials`` trials and write the summary; return it."""
    per_trial = []
    for index in range(num_trials):
        directory = trial_dir(output_dir, index)
        metrics_path = os.path.join(directory, METRICS_FILE)
        if os.path.isfile(metrics_path):
            logger.info("trial %d already done: %s", index, metrics_path)
        else:
            run_trial(config_file, directory, first_seed + index, num_gpus, opts)
        per_trial.append(read_trial_metrics(metrics_path))
    summary = summarize(per_trial)
    markdown = format_markdown(per_trial, summary, reference)
    result = {
        "config_file": config_file,
        "seeds": [first_seed + i for i in range(num_trials)],
        "trials": per_trial,
        "summary": summary,
        "reference": reference,
    }
    atomic_write_text(json.dumps(result, indent=2) + "\n", os.path.join(output_dir, SUMMARY_JSON))
    atomic_write_text(markdown, os.path.join(output_dir, SUMMARY_MD))
    return result, markdown


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Fine-tune and evaluate the same weights N times with different seeds; "
        "report mean ± std of AP, AP50, AP75 (rerun to resume a half-done set)."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--num-trials", type=int, default=5)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="trial k uses SEED first_seed + k"
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="per trial")
    parser.add_argument(
        "--output-dir",
        required=True,
        help="trial_<k>/ folders and trials_summary.{json,md} go here",
    )
    parser.add_argument(
        "--reference",
        choices=sorted(VOC_DETECTION),
        default="MoCo v2 200ep",
        help="published row printed for comparison",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides passed to every trial, e.g. MODEL.WEIGHTS w.pkl",
    )
    args = parser.parse_args(argv)
    if args.num_trials < 1:
        parser.error("--num-trials must be at least 1")
    if not os.path.isfile(args.config_file):
        raise UserError(f"config file not found: {args.config_file}")
    return args


def main(argv):
    from detectron2.utils.logger import setup_logger

    args = parse_args(argv)
    setup_logger(name="moco_d2")
    _, markdown = run_trials(
        args.config_file,
        args.output_dir,
        args.num_trials,
        args.first_seed,
        args.num_gpus,
        args.opts,
        args.reference,
    )
    print(markdown, end="")
    print(f"summary written to {os.path.join(args.output_dir, SUMMARY_MD)} and {SUMMARY_JSON}")
    return 0
