#!/usr/bin/env python
"""Epochs of ``tools/pretrain_moco.py`` as its users run it, timed from its own log.

Runs the tool (a run of one process) with the arguments after ``--`` and reads
``OUTPUT_DIR/log.txt``: img/s per epoch as logged, each epoch's wall time between log lines (the
first from the run's opening line), and the time an epoch spends outside its steps, wall minus
images / img/s: what the epoch boundary costs.

    python benchmarks/pretrain_epochs.py -- DIR -a resnet18 --epochs 2 --output-dir out/cli
"""

import datetime
import os
import re
import sys

import common

STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+\] "


def parse_args(argv):
    p = common.parser(__doc__, "pretrain_epochs.json")
    common.add_tool_arguments(p, "tools/pretrain_moco.py")
    args = p.parse_args(argv)
    args.tool = common.pretrain_config(common.tool_arguments(args))
    return args


def _stamp(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def figures(log: str) -> dict:
    """Per epoch: img/s, wall seconds and seconds outside the steps; images per epoch."""
    run = re.search(STAMP + r"MoCo .*?(\d+) images, batch (\d+) per process", log, re.M)
    epochs = re.findall(STAMP + r"epoch (\d+)/\d+: .*?([\d.]+) img/s", log, re.M)
    previous = _stamp(run.group(1)) if run else None
    images = int(run.group(2)) // int(run.group(3)) * int(run.group(3)) if run else None
    rows = []
    for when, epoch, rate in epochs:
        wall = (_stamp(when) - previous).total_seconds() if previous else None
        outside = wall - images / float(rate) if wall is not None and float(rate) > 0 else None
        rows.append(
            {
                "epoch": int(epoch),
                "img_per_s": float(rate),
                "wall_s": wall,
                "outside_steps_s": outside,
            }
        )
        previous = _stamp(when)
    return {"epochs": rows, "images_per_epoch": images}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common.run_tool([sys.executable, "tools/pretrain_moco.py", *common.tool_arguments(args)])
    with open(os.path.join(args.tool.output_dir, "log.txt")) as f:
        result = figures(f.read())
    keys = ("epoch", "img_per_s", "wall_s", "outside_steps_s")
    common.print_table(
        ["epoch", "img/s", "wall s", "outside the steps s"],
        [[e[k] for k in keys] for e in result["epochs"]],
        f"{result['images_per_epoch']} images per epoch",
    )
    result["summary"] = "; ".join(
        f"epoch {e['epoch']}: {common.fmt(e['img_per_s'])} img/s" for e in result["epochs"]
    )
    common.write_json(args.json, {**result, "config": common.tool_arguments(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
