#!/usr/bin/env bash
# One unattended check of a GPU machine, in 8 minutes or less (docs/speed.md, "GPU check").
#
# Run from anywhere after benchmarks/gpu_prepare.sh has built .device/site/ (detectron2 and the
# other pure-Python packages a bare GPU machine lacks). Steps, each under its own timeout and
# within one overall deadline; a failing step does not stop the next:
#   env         nvidia-smi, torch/torchvision/cuDNN/NCCL versions, the .device/site imports
#   jpegs       photo-like 500x375 JPEGs (the benchmark's make_jpeg_folder), in parallel
#   throughput  benchmarks/pretrain_throughput.py, released and fast modes; fast again with the
#               other --decode-on; benchmarks/split_bn_overhead.py
#   tests       the CUDA tests: pytest -k "gpu or cuda" (the gpu marker is a keyword too)
#   cli         2 epochs of tools/pretrain_moco.py with the released one-GPU flags
#   demo        tools/demo.py
#   train_net   50 iterations of tools/train_net.py at the VOC config's sizes, AMP on
# Then one table (step | status | key figures | seconds) and $OUT/summary.json.
#
# Environment:
#   PYTHON              default python3
#   OUT                 one log per step and summary.json (8 files); default output/gpu_check
#   GPU_CHECK_WORK      throughput.json, checkpoints, images, datasets; emptied first;
#                       default /tmp/gpu_check_work
#   GPU_CHECK_DEVICE    cuda (default) or cpu
#   GPU_CHECK_TINY=1    toy sizes, so that the whole script runs on a small CPU
#   GPU_CHECK_BUDGET_S  overall deadline: 460 s, or 1200 s with GPU_CHECK_TINY=1 (whose step
#                       timeouts are 3x longer)
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-output/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
# .device/site only where PYTHON lacks what it holds: its pycocotools is built for Python 3.12.
# (A step run as `--step` inherits the PYTHONPATH chosen here.)
if [ "${1:-}" != --step ]; then
    if PYTHONPATH="$PWD" "$PYTHON" -c "import detectron2, fvcore, pycocotools._mask" 2>/dev/null
    then
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD:$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# A one-rank NCCL process group hung on the H200 machine without these (docs/speed.md).
export NCCL_SOCKET_IFNAME=lo NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 \
    NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0

if [ "$TINY" = 1 ]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-1200} CAP_SCALE=3
    ARCH=resnet18 CROP=64 BATCH=8 WORKERS=2 PARTS=4 PER_PART=8 MOCO_K=256
    BENCH_EXTRA=(--warmup 1 --iters 2 --e2e-iters 2)
    DEMO_FLAGS=(--pretrain-images 16 --pretrain-epochs 1 --pretrain-batch 8 --moco-k 32
        --det-train-images 4 --det-test-images 2 --max-iter 2)
    VOC=(8 2 96) # train images, test images, image size
    DET_FLAGS=(INPUT.MIN_SIZE_TRAIN "(96,)" INPUT.MAX_SIZE_TRAIN 96 INPUT.MIN_SIZE_TEST 96
        INPUT.MAX_SIZE_TEST 96 MODEL.RPN.PRE_NMS_TOPK_TRAIN 300 MODEL.RPN.POST_NMS_TOPK_TRAIN 64
        MODEL.RPN.PRE_NMS_TOPK_TEST 300 MODEL.RPN.POST_NMS_TOPK_TEST 20
        MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 16 SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 4
        TEST.PRECISE_BN.NUM_ITER 2 DATALOADER.NUM_WORKERS 1)
else
    BUDGET=${GPU_CHECK_BUDGET_S:-460} CAP_SCALE=1
    ARCH=resnet50 CROP=224 BATCH=256 WORKERS=16 PARTS=16 PER_PART=256 MOCO_K=65536
    BENCH_EXTRA=()
    DEMO_FLAGS=()
    VOC=(64 8 500)
    # The VOC config's input sizes, RPN top-k and ROI batch as they are; one GPU's batch.
    DET_FLAGS=(SOLVER.IMS_PER_BATCH 8 SOLVER.BASE_LR 0.01 SOLVER.MAX_ITER 50
        TEST.PRECISE_BN.NUM_ITER 10 DATALOADER.NUM_WORKERS 8)
fi
CLI_PARTS=$((PARTS / 2))
BENCH=(-a "$ARCH" --crop-size "$CROP" -b "$BATCH" -j "$WORKERS" --device "$DEVICE"
    --moco-k "$MOCO_K" --data "$WORK/jpegs" --num-images $((PARTS * PER_PART)) "${BENCH_EXTRA[@]}")
if [ "$DEVICE" = cpu ]; then
    AMP=False SPLIT_BN_DTYPE=fp32
    CLI_DEVICE=(--device cpu)
else
    AMP=True SPLIT_BN_DTYPE=bf16
    CLI_DEVICE=()
fi

# run_step NAME CAP_SECONDS COMMAND...: the command under `timeout`, its output in
# $OUT/NAME.log, and "name<TAB>status<TAB>seconds" in $STEPS. The timeout is the smaller of
# CAP x CAP_SCALE and what is left of the overall budget. A function of this script runs as
# `$SELF --step FUNCTION`, so that `timeout` can stop it.
run_step() {
    local name=$1 cap=$(($2 * CAP_SCALE)) left status rc begin
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    [ "$cap" -lt "$left" ] || cap=$left
    if [ "$cap" -lt 10 ]; then
        printf '%s\tskipped (out of time)\t0\n' "$name" >>"$STEPS"
        return
    fi
    echo "== $name (timeout ${cap} s): $*"
    begin=$SECONDS
    if declare -F "$1" >/dev/null; then
        set -- bash "$SELF" --step "$1"
    fi
    timeout -k 10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout (${cap} s)" ;;
        *) status="failed (rc $rc)" ;;
    esac
    printf '%s\t%s\t%d\n' "$name" "$status" $((SECONDS - begin)) >>"$STEPS"
    echo "   $status in $((SECONDS - begin)) s; log: $OUT/$name.log"
}

skip_step() {
    printf '%s\tskipped (%s)\t0\n' "$1" "$2" >>"$STEPS"
    echo "== $1: skipped ($2)"
}

env_report() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" - "$WORK/env.json" <<'PY'
import importlib
import json
import os
import platform
import sys

import torch
import torchvision

cuda = torch.cuda.is_available()
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "cuda_available": cuda,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
    "gpu": torch.cuda.get_device_name() if cuda else None,
    "cpus": os.cpu_count(),
}
missing = []
for module in ("moco_d2.detection", "detectron2", "fvcore.nn", "pycocotools._mask"):
    try:
        importlib.import_module(module)
    except Exception as e:  # report every missing piece, not only the first
        missing.append(f"{module}: {type(e).__name__}: {e}")
info["import_errors"] = missing
print(json.dumps(info, indent=2))
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
sys.exit(1 if missing else 0)
PY
}

make_jpegs() {
    "$PYTHON" - "$WORK/jpegs" "$PARTS" "$PER_PART" <<'PY'
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, "benchmarks")
from pretrain_throughput import make_jpeg_folder  # noqa: E402

root, parts, per_part = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
folders = [os.path.join(root, f"part{k:02d}") for k in range(parts)]
with ProcessPoolExecutor(min(parts, os.cpu_count() or 1)) as pool:
    list(pool.map(make_jpeg_folder, folders, [per_part] * parts, range(parts)))
print(f"{parts * per_part} JPEGs in {root}")
PY
    mkdir -p "$WORK/jpegs_cli"
    for ((k = 0; k < CLI_PARTS; k++)); do
        ln -s "$WORK/jpegs/part$(printf %02d $k)" "$WORK/jpegs_cli/"
    done
}

# The benchmark's two modes; its fast mode again with the other --decode-on (the CUDA default
# is to be the faster one); SplitBatchNorm(8) against BatchNorm2d in the step's dtype.
throughput() {
    local other=device rc=0
    [ "$DEVICE" = cpu ] || other=loader
    "$PYTHON" benchmarks/pretrain_throughput.py "${BENCH[@]}" --json "$WORK/throughput.json" ||
        rc=$?
    "$PYTHON" benchmarks/pretrain_throughput.py "${BENCH[@]}" --modes fast --decode-on "$other" \
        --json "$WORK/throughput_decode.json" || rc=$?
    "$PYTHON" benchmarks/split_bn_overhead.py --device "$DEVICE" --dtype "$SPLIT_BN_DTYPE" \
        --impl module --json "$WORK/split_bn.json" || rc=$?
    return $rc
}

train_net_voc() {
    "$PYTHON" -c "from moco_d2.detection.data.synthetic import make_synthetic_voc as m; \
print(m('$WORK/voc', num_train=${VOC[0]}, num_test=${VOC[1]}, image_size=${VOC[2]}, \
num_classes_used=20, max_objects=3))" || return
    DETECTRON2_DATASETS="$WORK/voc" "$PYTHON" tools/train_net.py \
        --config-file configs/voc_R50_C4.yaml --num-gpus 1 MODEL.WEIGHTS "" \
        MODEL.DEVICE "$DEVICE" SOLVER.AMP.ENABLED "$AMP" SOLVER.STEPS "()" TEST.EVAL_PERIOD 0 \
        SOLVER.CHECKPOINT_PERIOD 100000 OUTPUT_DIR "$WORK/train_net" "${DET_FLAGS[@]}"
}

if [ "${1:-}" = --step ]; then
    "$2"
    exit
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$WORK"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export OUT WORK
STEPS="$WORK/steps.tsv"
: >"$STEPS"
START=$SECONDS
echo "PYTHONPATH=$PYTHONPATH"
case $PYTHONPATH in
    *.device/site*)
        [ -d .device/site ] || echo "warning: no .device/site; run benchmarks/gpu_prepare.sh" >&2
        ;;
esac

run_step env 60 env_report
run_step jpegs 90 make_jpegs
run_step throughput 240 throughput
if [ "$DEVICE" = cpu ]; then
    skip_step tests "no CUDA"
else
    run_step tests 150 "$PYTHON" -m pytest tests -q -k "gpu or cuda" -p no:cacheprovider \
        --junitxml "$WORK/tests.xml"
fi
run_step cli 120 "$PYTHON" tools/pretrain_moco.py "$WORK/jpegs_cli" -a "$ARCH" -b "$BATCH" \
    -j "$WORKERS" --amp --multiprocessing-distributed --world-size 1 --rank 0 \
    --dist-url "tcp://127.0.0.1:$((20000 + RANDOM % 20000))" --epochs 2 --moco-k "$MOCO_K" \
    --crop-size "$CROP" --output-dir "$WORK/cli" "${CLI_DEVICE[@]}"
run_step demo 180 "$PYTHON" tools/demo.py --device "$DEVICE" --output-dir "$WORK/demo" \
    "${DEMO_FLAGS[@]}"
run_step train_net 150 train_net_voc

"$PYTHON" - "$STEPS" "$OUT" "$WORK" "$TINY" "$DEVICE" $((SECONDS - START)) <<'PY'
"""Key figures from each step's files; one table on stdout and summary.json."""

import datetime
import json
import os
import re
import statistics
import sys
import xml.etree.ElementTree as ET

steps_file, out, work, tiny, device, total = sys.argv[1:7]


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(value, spec=None, unit=""):
    """``spec`` None: 0, 1 or 2 decimals for >= 100, >= 1, smaller (img/s on GPUs and CPUs)."""
    if value is None:
        return "n/a"
    if spec is None:
        spec = ".0f" if abs(value) >= 100 else ".1f" if abs(value) >= 1 else ".2f"
    return f"{value:{spec}}{unit}"


def env():
    info = load_json(os.path.join(work, "env.json")) or {}
    text = (
        f"{info.get('gpu') or 'no GPU'}; torch {info.get('torch')}, torchvision "
        f"{info.get('torchvision')}, cuDNN {info.get('cudnn')}, NCCL {info.get('nccl')}"
    )
    if info.get("import_errors"):
        text += f"; import errors: {len(info['import_errors'])} (see env.log)"
    return info, text


def throughput():
    data = load_json(os.path.join(work, "throughput.json"))
    if not data:
        return {}, "n/a"
    released, fast = data.get("released", {}), data.get("fast", {})

    def pick(mode, key):
        return mode.get(key, data.get(key))

    figures = {
        "released_img_per_s": released.get("img_per_s"),
        "fast_img_per_s": fast.get("img_per_s"),
        "ratio": data.get("ratio_img_per_s"),
        "fast_step_img_per_s": fast.get("step_img_per_s"),
        "fast_step_img_per_s_bn_splits_1": pick(fast, "step_img_per_s_bn_splits_1"),
        "bn_splits": pick(fast, "bn_splits"),
        "released_host_ms_per_img": released.get("host_ms_per_img"),
        "fast_host_ms_per_img": fast.get("host_ms_per_img"),
        "released_epoch_overhead_s": pick(released, "epoch_overhead_s"),
        "fast_epoch_overhead_s": pick(fast, "epoch_overhead_s"),
        "fast_main_process_cpu_ms_per_img": fast.get("main_process_cpu_ms_per_img"),
        "fast_decode_on": fast.get("decode_on"),
    }
    other = (load_json(os.path.join(work, "throughput_decode.json")) or {}).get("fast", {})
    figures["other_decode_on"] = other.get("decode_on")
    figures["other_decode_img_per_s"] = other.get("img_per_s")
    split = load_json(os.path.join(work, "split_bn.json")) or {}
    for row in split.get("rows", []):
        figures[f"split_bn_ratio_{row['format']}"] = row["ratio"]
    f = figures
    text = (
        f"img/s released {fmt(f['released_img_per_s'])}, fast {fmt(f['fast_img_per_s'])} "
        f"({fmt(f['ratio'], '.2f', 'x')}); fast step {fmt(f['fast_step_img_per_s'])} "
        f"(bn-splits {fmt(f['bn_splits'], '')}), bn-splits 1 "
        f"{fmt(f['fast_step_img_per_s_bn_splits_1'])}; host ms/img "
        f"{fmt(f['released_host_ms_per_img'], '.2f')} / {fmt(f['fast_host_ms_per_img'], '.2f')}; "
        f"epoch overhead s {fmt(f['released_epoch_overhead_s'], '.2f')} / "
        f"{fmt(f['fast_epoch_overhead_s'], '.2f')}; fast main-process CPU ms/img "
        f"{fmt(f['fast_main_process_cpu_ms_per_img'], '.2f')}; decode {f['fast_decode_on']} "
        f"vs {f['other_decode_on']}: {fmt(f['other_decode_img_per_s'])} img/s; SplitBN(8)/BN2d "
        + ", ".join(
            f"{k.removeprefix('split_bn_ratio_')} {fmt(v, '.2f', 'x')}"
            for k, v in f.items()
            if k.startswith("split_bn_ratio_")
        )
    )
    return figures, text


def tests():
    try:
        suite = ET.parse(os.path.join(work, "tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return {}, "n/a"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    text = (
        f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
        f"{counts['skipped']} skipped"
    )
    return counts, text


STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+\] "


def stamp(text):
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def cli():
    """img/s per epoch as logged, each epoch's wall time between log lines, and the time an
    epoch spends outside its steps (wall minus images / img/s): the boundary cost."""
    try:
        with open(os.path.join(work, "cli", "log.txt")) as f:
            log = f.read()
    except OSError:
        return {}, "n/a"
    run = re.search(STAMP + r"MoCo .*?(\d+) images, batch (\d+) per process x (\d+)", log, re.M)
    epochs = re.findall(STAMP + r"epoch (\d+)/\d+: .*?([\d.]+) img/s", log, re.M)
    previous = stamp(run.group(1)) if run else None
    per_step = int(run.group(3)) * int(run.group(4)) if run else None
    images = int(run.group(2)) // per_step * per_step if run else None
    rows = []
    for when, epoch, rate in epochs:
        wall = (stamp(when) - previous).total_seconds() if previous else None
        outside = wall - images / float(rate) if wall is not None and float(rate) > 0 else None
        rows.append(
            {
                "epoch": int(epoch),
                "img_per_s": float(rate),
                "wall_s": wall,
                "outside_steps_s": outside,
            }
        )
        previous = stamp(when)
    text = "; ".join(
        f"epoch {r['epoch']}: {fmt(r['img_per_s'])} img/s, {fmt(r['wall_s'], '.1f', ' s')} "
        f"({fmt(r['outside_steps_s'], '.1f', ' s')} outside steps)"
        for r in rows
    )
    return {"epochs": rows, "images_per_epoch": images}, text or "n/a"


def demo():
    data = load_json(os.path.join(work, "demo", "results.json"))
    if not data:
        return {}, "n/a"
    results = data.get("results", {})
    text = "; ".join(
        f"{key} AP {fmt(r.get('AP'), '.1f')} / AP50 {fmt(r.get('AP50'), '.1f')}"
        for key, r in results.items()
    )
    return results, text


def train_net():
    """s/iter: detectron2's metrics.json 'time' is the median of the last 20 iterations at
    each record (every 20 iterations and the last); records from iteration 39 on cover the
    iterations after the first 20. Plus the trainer's own overall s/iter line."""
    records = []
    try:
        with open(os.path.join(work, "train_net", "metrics.json")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    timed = [r for r in records if "time" in r]
    late = [r for r in timed if r["iteration"] >= 39] or timed[-1:]
    figures = {"s_per_iter": None, "data_s_per_iter": None, "iterations": []}
    if late:
        figures["s_per_iter"] = statistics.mean(r["time"] for r in late)
        figures["data_s_per_iter"] = statistics.mean(r.get("data_time", 0) for r in late)
        # the 1-based iterations that those medians cover
        figures["iterations"] = [max(1, late[0]["iteration"] - 18), late[-1]["iteration"] + 1]
    try:
        with open(os.path.join(out, "train_net.log")) as f:
            log = f.read()
    except OSError:
        log = ""
    overall = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", log)
    figures["overall_s_per_iter"] = float(overall.group(2)) if overall else None
    memory = re.findall(r"max_mem: (\d+)M", log)
    figures["max_mem_mib"] = int(memory[-1]) if memory else None
    if not timed and not overall:
        return figures, "n/a"
    text = (
        f"{fmt(figures['s_per_iter'], '.3f')} s/iter "
        f"(data {fmt(figures['data_s_per_iter'], '.3f')}) over iterations "
        f"{'-'.join(map(str, figures['iterations']))}"
        f"; overall {fmt(figures['overall_s_per_iter'], '.3f')} s/iter; max mem "
        f"{fmt(figures['max_mem_mib'], '', ' MiB')}"
    )
    return figures, text


readers = {
    "env": env,
    "throughput": throughput,
    "tests": tests,
    "cli": cli,
    "demo": demo,
    "train_net": train_net,
}
rows = []
with open(steps_file) as f:
    for line in f:
        name, status, seconds = line.rstrip("\n").split("\t")
        ran = name in readers and not status.startswith("skipped")
        figures, text = readers[name]() if ran else ({}, "")
        rows.append(
            {
                "step": name,
                "status": status,
                "figures": figures,
                "text": text,
                "seconds": int(seconds),
                "log": os.path.join(out, f"{name}.log"),
            }
        )

print(f"\nGPU check ({'tiny, ' if tiny == '1' else ''}device {device}), {total} s in all")
widths = [max(len(r["step"]) for r in rows), max(len(r["status"]) for r in rows)]
print(f"{'step':<{widths[0]}} | {'status':<{widths[1]}} | key figures | seconds")
for r in rows:
    print(f"{r['step']:<{widths[0]}} | {r['status']:<{widths[1]}} | {r['text']} | {r['seconds']}")
summary = {
    "device": device,
    "tiny": tiny == "1",
    "total_s": int(total),
    "work": work,
    "steps": rows,
    "throughput_json": load_json(os.path.join(work, "throughput.json")),
    "throughput_decode_json": load_json(os.path.join(work, "throughput_decode.json")),
    "split_bn_json": load_json(os.path.join(work, "split_bn.json")),
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"summary: {os.path.join(out, 'summary.json')}; logs in {out}; outputs in {work}")
PY
