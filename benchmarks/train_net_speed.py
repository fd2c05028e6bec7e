#!/usr/bin/env python
"""Seconds per iteration and peak memory of ``tools/train_net.py`` on a synthetic VOC07+12 tree.

Writes the tree (``--voc TRAIN TEST SIZE``: images and their size in pixels, all 20 classes) to
``WORK/voc``, runs the tool with the arguments after ``--`` and ``OUTPUT_DIR WORK/out``, and
reads its figures: s/iter from detectron2's metrics.json, whose ``time`` is the median of the
last 20 iterations at each record (every 20 iterations and the last), so the records from
iteration 39 on cover the iterations after the first 20; the trainer's overall s/iter line; and
the last ``max_mem`` the log gives.

    python benchmarks/train_net_speed.py --work /tmp/train_net -- \\
        --config-file configs/voc_R50_C4.yaml --num-gpus 1 MODEL.WEIGHTS "" SOLVER.MAX_ITER 50
"""

import json
import os
import re
import statistics
import sys

import common


def parse_args(argv):
    p = common.parser(__doc__, "train_net_speed.json")
    p.add_argument("--work", default="output/train_net_speed", help="the tree and the run go here")
    p.add_argument(
        "--voc", type=int, nargs=3, default=[64, 8, 500], metavar=("TRAIN", "TEST", "PX")
    )
    common.add_tool_arguments(p, "tools/train_net.py")
    return p.parse_args(argv)


def figures(metrics_path: str, log: str) -> dict:
    """s/iter (mean of the records from iteration 39 on, else the last), data s/iter, the
    iterations they cover, the trainer's overall s/iter and the peak memory in MiB."""
    try:
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        records = []
    timed = [r for r in records if "time" in r]
    late = [r for r in timed if r["iteration"] >= 39] or timed[-1:]
    result = {"s_per_iter": None, "data_s_per_iter": None, "iterations": []}
    if late:
        result["s_per_iter"] = statistics.mean(r["time"] for r in late)
        result["data_s_per_iter"] = statistics.mean(r.get("data_time", 0) for r in late)
        result["iterations"] = [max(1, late[0]["iteration"] - 18), late[-1]["iteration"] + 1]
    overall = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", log)
    result["overall_s_per_iter"] = float(overall.group(2)) if overall else None
    memory = re.findall(r"max_mem: (\d+)M", log)
    result["max_mem_mib"] = int(memory[-1]) if memory else None
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    voc = common.synthetic_voc(os.path.join(args.work, "voc"), *args.voc)
    out = os.path.join(args.work, "out")
    command = [
        sys.executable,
        "tools/train_net.py",
        *common.tool_arguments(args),
        "OUTPUT_DIR",
        out,
    ]
    log = common.run_tool(command, dict(os.environ, DETECTRON2_DATASETS=voc))
    result = figures(os.path.join(out, "metrics.json"), log)
    keys = ("s_per_iter", "data_s_per_iter", "overall_s_per_iter", "max_mem_mib")
    header = ["s/iter", "data s/iter", "overall s/iter", "max mem MiB", "iterations"]
    common.print_table(header, [[*(result[k] for k in keys), str(result["iterations"])]])
    memory = common.fmt(result["max_mem_mib"])
    result["summary"] = f"{common.fmt(result['s_per_iter'])} s/iter, max mem {memory} MiB"
    common.write_json(args.json, {**result, "config": common.config(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
