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

from moco_d2.detection.trainer import COCO_METRIC_NAMES, METRICS_FILE, METRICS_FILES
from moco_d2.errors import UserError
from moco_d2.published import VOC_DETECTION
from moco_d2.utils.fileio import atomic_write_text

logger = logging.getLogger("moco_d2.detection.trials")

METRIC_NAMES = ("AP", "AP50", "AP75")
SUMMARY_JSON = "trials_summary.json"
SUMMARY_MD = "trials_summary.md"


def trial_dir(output_dir, index):
    return os.path.join(output_dir, f"trial_{index}")


def trial_metrics_path(directory: str) -> str:
    """The metrics file a finished trial wrote (VOC or COCO); the VOC name if there is none."""
    for name in METRICS_FILES.values():
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return os.path.join(directory, METRICS_FILE)


def read_trial_metrics(path: str) -> dict:
    """The (single) test dataset's metrics in one trial's file: ``{"AP", "AP50", "AP75"}``
    for VOC; for COCO box ``AP`` ... ``APl`` and, for Mask R-CNN, a ``"segm"`` block of the same.
    """
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read trial metrics {path}: {e}") from None
    if len(metrics) != 1:
        raise UserError(f"{path}: expected one test dataset, found {sorted(metrics)}")
    (values,) = metrics.values()
    names = COCO_METRIC_NAMES if "APs" in values else METRIC_NAMES
    try:
        trial = {name: float(values[name]) for name in names}
        if "segm" in values:
            trial["segm"] = {name: float(values["segm"][name]) for name in COCO_METRIC_NAMES}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: missing or bad metric {e}") from None
    return trial


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


def summarize(per_trial: list[dict]) -> dict:
    """Mean and sample standard deviation (n-1) of each metric over trials; box metrics at the
    top level and, when the trials have masks, a ``"segm"`` block of the same."""
    summary = {}
    for name in (name for name in per_trial[0] if name != "segm"):
        values = [trial[name] for trial in per_trial]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = {"mean": statistics.fmean(values), "std": std}
    if "segm" in per_trial[0]:
        summary["segm"] = summarize([trial["segm"] for trial in per_trial])
    return summary


def _columns(per_trial: list[dict]) -> list[tuple[str, str | None, str]]:
    """``(header, block, metric)`` per table column: box metrics, then mask ones if any."""
    box = [name for name in per_trial[0] if name != "segm"]
    if "segm" not in per_trial[0]:
        return [(name, None, name) for name in box]
    masks = [(f"mask {name}", "segm", name) for name in per_trial[0]["segm"]]
    return [(f"box {name}", None, name) for name in box] + masks


def format_markdown(per_trial: list[dict], summary: dict, reference: str | None) -> str:
    """One row per trial and the mean ± std; the published VOC row only for VOC trials."""
    columns = _columns(per_trial)

    def cells(values: dict, fmt) -> str:
        return " | ".join(
            fmt(values[name] if block is None else values[block][name])
            for _, block, name in columns
        )

    lines = [
        "| run | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for index, trial in enumerate(per_trial):
        lines.append(f"| trial {index} | " + cells(trial, lambda v: f"{v:.2f}") + " |")
    lines.append(
        f"| **mean ± std ({len(per_trial)} trials)** | "
        + cells(summary, lambda v: f"**{v['mean']:.2f} ± {v['std']:.2f}**")
        + " |"
    )
    if reference and set(per_trial[0]) == set(METRIC_NAMES):
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
        metrics_path = trial_metrics_path(directory)
        if os.path.isfile(metrics_path):
            logger.info("trial %d already done: %s", index, metrics_path)
        else:
            run_trial(config_file, directory, first_seed + index, num_gpus, opts)
            metrics_path = trial_metrics_path(directory)
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
        "report mean ± std of AP, AP50, AP75 (VOC) or box and mask AP, AP50, AP75, APs, APm, "
        "APl (COCO); rerun to resume a half-done set."
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
        help="published VOC row printed for comparison (VOC trials only)",
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
