#!/usr/bin/env python
"""One unattended check of a GPU machine, in 8 minutes or less (docs/speed.md, "GPU check").

Runs the commands of :func:`commands` (benchmarks, tests, tools), most important first, each in a
process group of its own under its own timeout, within one deadline (``--budget``): a command
that would start after it is skipped, and one that fails or times out does not stop the next.
Each writes its figures to ``WORK/NAME.json`` as it goes; the summary reads them back: a table
(step | status | key figures | seconds), the CUDA defaults the figures support, and
``OUT/summary.json``; ``OUT/gpu_check.log`` holds every command's output. Run from the
repository root, after ``benchmarks/gpu_prepare.sh`` has built ``.device/site/``:

    python3 benchmarks/gpu_check.py                      # --out output/gpu_check
    python3 benchmarks/gpu_check.py --device cpu --tiny  # every step at toy size, on a CPU
"""

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import common

SITE, DALI = (os.path.join(common.REPO, ".device", d) for d in ("site", "dali"))
# A one-rank NCCL process group hung on the H200 machine without these (docs/speed.md).
NCCL_ENV = {
    "NCCL_SOCKET_IFNAME": "lo", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1", "NCCL_NVLS_ENABLE": "0", "NCCL_CUMEM_ENABLE": "0",
}  # fmt: skip
CUDA_TESTS = "gpu or cuda"
IMAGENET_IMAGES = 1_281_167  # one epoch of ImageNet-1k train
TARGETS = {"img_per_s": 3000.0, "over_released": 3.0, "bn_splits_step": 0.95, "host_ms": 1.0}


# What each mode runs at. bn_splits: the tool's default at this batch and crop; bench, demo: extra
# flags of pretrain_throughput.py and tools/demo.py; voc: train images, test images, their size;
# detection: train_net's config overrides; cap_scale multiplies every step's timeout.
FULL = SimpleNamespace(
    arch="resnet50", crop=224, batch=256, workers=min(16, os.cpu_count() or 1), jpeg_parts=16,
    per_part=256, moco_k=65536, bn_splits=8, bench=(), demo=(), voc=(64, 8, 500), budget_s=480,
    # the VOC config's input sizes, RPN top-k and ROI batch as they are; one GPU's batch
    detection=("SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "50",
               "TEST.PRECISE_BN.NUM_ITER", "10", "DATALOADER.NUM_WORKERS", "8"), cap_scale=1,
)  # fmt: skip
TINY = SimpleNamespace(
    arch="resnet18", crop=64, batch=8, workers=2, jpeg_parts=4, per_part=8, moco_k=256,
    bn_splits=2, bench=("--warmup", "1", "--iters", "2", "--e2e-iters", "2"),
    demo=("--pretrain-images", "16", "--pretrain-epochs", "1", "--pretrain-batch", "8",
          "--moco-k", "32", "--det-train-images", "4", "--det-test-images", "2", "--max-iter", "2"),
    voc=(8, 2, 96), budget_s=1500, cap_scale=3,
    detection=(
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "TEST.PRECISE_BN.NUM_ITER", "2",
        "DATALOADER.NUM_WORKERS", "1",
    ),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    cap_s: int  # its timeout at full size
    command: list[str]
    output: str = ""  # what it writes under WORK (default: NAME.json)
    cuda_only: bool = False


def commands(s: SimpleNamespace, device: str, work: str) -> list[Step]:
    """Every command of the check, most important first: correctness, the end-to-end figures,
    then what decides the defaults."""
    py, cuda = sys.executable, device != "cpu"

    def w(*parts: str) -> str:
        return os.path.join(work, *parts)

    def bench(script: str, name: str, *argv: str) -> list[str]:
        return [py, f"benchmarks/{script}.py", "--json", w(f"{name}.json"), *argv]

    size = ["-b", str(s.batch), "-j", str(s.workers), "--crop-size", str(s.crop)]
    run = ["--data", w("jpegs"), "-a", s.arch, *size, "--device", device]
    run += ["--moco-k", str(s.moco_k), *s.bench]
    split_bn = ["--device", device, "--dtype", "bf16" if cuda else "fp32", "--resnet50"]
    split_bn += [str(s.batch), str(s.crop), "--num-splits", str(s.bn_splits), "--format"]
    train_net = [
        "--config-file", "configs/voc_R50_C4.yaml", "--num-gpus", "1", "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", str(cuda), "SOLVER.STEPS", "()",
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100000", *s.detection,
    ]  # fmt: skip
    cli = [w("jpegs_half"), "-a", s.arch, *size, "--multiprocessing-distributed", "--world-size"]
    cli += ["1", "--rank", "0", "--epochs", "2", "--moco-k", str(s.moco_k), "--device", device]
    cli += ["--output-dir", w("cli"), *(["--amp"] if cuda else [])]
    jpegs = [w("jpegs"), "--parts", str(s.jpeg_parts), "--per-part", str(s.per_part)]
    decode = ["--data", w("jpegs"), *size, "--device", device, "--num-images", "64"]
    pytest = [py, "-m", "pytest", "tests", "-q", "-k", CUDA_TESTS, "-p", "no:cacheprovider"]
    return [
        Step("env", 45, bench("environment", "env", "--device", device)),
        Step("jpegs", 60, bench("make_jpegs", "jpegs", *jpegs, "--half", w("jpegs_half"))),
        Step("tests", 100, [*pytest, "--junitxml", w("tests.xml")], "tests.xml", cuda_only=True),
        Step("e2e", 90, bench("pretrain_throughput", "e2e", *run)),
        Step("e2e_other_decode", 40, bench("pretrain_throughput", "e2e_other_decode", *run,
             "--modes", "fast", "--decode-on", "loader" if cuda else "device")),
        Step("dali", 45, bench("feed_throughput", "dali", *run, "--modes", "dali")),
        Step("augment", 20, bench("pretrain_throughput", "augment", *run, "--modes", "augment")),
        Step("decode", 30, bench("decode_host_cost", "decode", *decode, "--receive-batches", "3",
             "--wait", "1")),
        Step("feeds", 75, bench("feed_throughput", "feeds", *run, "--modes", "feeds")),
        Step("step", 220, bench("pretrain_throughput", "step", *run, "--modes", "steps")),
        Step("split_bn", 70, bench("split_bn_overhead", "split_bn", *split_bn, "channels_last",
             "--compile")),
        Step("split_bn_nchw", 30, bench("split_bn_overhead", "split_bn_nchw", *split_bn, "nchw")),
        Step("train_net", 90, bench("train_net_speed", "train_net", "--work", w("train_net"),
             "--voc", *map(str, s.voc), "--", *train_net)),
        Step("cli", 60, bench("pretrain_epochs", "cli", "--", *cli)),
        Step("demo", 240, [py, "tools/demo.py", "--device", device, "--output-dir", w("demo"),
             *s.demo], "demo/comparison.json"),
    ]  # fmt: skip


STEP_NAMES = [step.name for step in commands(FULL, "cuda", "")]


def junit_counts(path: str) -> dict:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def key_figures(name: str, f: dict) -> str:
    """A step's key figures in one line: the benchmark's own ``summary``; for the tests and
    the demo, each row's AP50 and kNN top-1."""
    if name == "tests" and f:
        return f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
    if name == "demo":
        rows = [(r["name"], r["metrics"]["AP50"]["mean"], r["knn_top1"]) for r in f.get("rows", [])]
        return "; ".join(f"{n} AP50 {common.fmt(ap)}, kNN {common.fmt(k)}" for n, ap, k in rows)
    return f.get("summary", "")


def cuda_defaults(figures: dict[str, dict]) -> list[str]:
    """The defaults the measured figures support, and the targets met or missed."""
    fmt, lines = common.fmt, []
    e2e = figures.get("e2e") or {}
    fast, other = e2e.get("fast") or {}, (figures.get("e2e_other_decode") or {}).get("fast") or {}
    ours = max((fast, other), key=lambda r: r.get("img_per_s") or 0)  # the faster --decode-on
    if fast.get("img_per_s") and other.get("img_per_s"):
        rates = ", ".join(f"{fmt(r['img_per_s'])} with {r['decode_on']}" for r in (fast, other))
        lines.append(f"--decode-on {ours['decode_on']} (end to end {rates})")
    # the step alone by (default --bn-splits, compiled, channels_last)
    steps = (figures.get("step") or {}).get("steps", [])
    step = {(v["bn_splits"] != 1, v["compile"], v["channels_last"]): v for v in steps}
    flags = {"--channels-last": (True, False, True), "--no-channels-last": (True, False, False)}
    rates = {k: step[key]["step_img_per_s"] for k, key in flags.items() if key in step}
    compiled = step.get((True, True, True))
    if rates:  # compiled only where it beats the best eager format by 5% and compiles in an epoch
        best = max(rates, key=rates.get)
        wins = compiled and compiled["step_img_per_s"] >= 1.05 * rates[best]
        wins = wins and compiled["first_step_s"] < IMAGENET_IMAGES / compiled["step_img_per_s"]
        choice = "--channels-last --compile" if wins else best
        if compiled:
            rates["--channels-last --compile"] = compiled["step_img_per_s"]
        listed = ", ".join(f"{k} {fmt(r)}" for k, r in rates.items())
        took = f"; compiling took {compiled['first_step_s']:.0f} s" if compiled else ""
        lines.append(f"{choice} (step img/s at the default --bn-splits: {listed}{took})")
    for label in ("channels_last eager", "channels_last compiled", "NCHW eager"):
        key = ("compiled" in label, "channels_last" in label)  # compiled, channels_last
        split, plain = step.get((True, *key)), step.get((False, *key))
        if split and plain:
            ratio = split["step_img_per_s"] / plain["step_img_per_s"]
            met = "met" if ratio >= TARGETS["bn_splits_step"] else "missed"
            lines.append(f"step at --bn-splits {split['bn_splits']} / 1, {label}: {ratio:.2f}x "
                         f"(target {TARGETS['bn_splits_step']}x: {met})")  # fmt: skip
    dali = ((figures.get("dali") or {}).get("dali") or {}).get("img_per_s")
    if ours.get("img_per_s") and dali:  # the peer, against the faster --decode-on
        ratio, met = ours["img_per_s"] / dali, "met" if ours["img_per_s"] > dali else "missed"
        lines.append(f"fast/DALI {ratio:.2f}x, DALI {fmt(dali)} img/s (target >1x: {met})")
    if fast.get("img_per_s"):
        met = "met" if fast["img_per_s"] >= TARGETS["img_per_s"] else "missed"
        lines.append(f"fast end to end {fmt(fast['img_per_s'])} img/s (target 3,000: {met})")
    if e2e.get("ratio_img_per_s"):
        met = "met" if e2e["ratio_img_per_s"] >= TARGETS["over_released"] else "missed"
        lines.append(f"fast/released {e2e['ratio_img_per_s']:.2f}x (target 3x: {met})")
    host = [fast.get("host_ms_per_img"), fast.get("main_process_cpu_ms_per_img")]  # workers, main
    if None not in host:
        met = "met" if sum(host) <= TARGETS["host_ms"] else "missed"
        lines.append(f"host CPU {sum(host):.2f} ms/img (target 1.0: {met})")
    return lines


# ---- the runner --------------------------------------------------------------------------------


def step_environment() -> dict:
    """The commands' environment: the project first; .device/site and .device/dali only where
    this Python lacks what they hold (built for Python 3.12)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", **NCCL_ENV)
    path, bare = [common.REPO], dict(env, PYTHONPATH=common.REPO)
    for folder, modules in ((SITE, "detectron2, fvcore, pycocotools._mask"), (DALI, "nvidia.dali")):
        probe = [sys.executable, "-c", f"import {modules}"]
        if subprocess.run(probe, env=bare, capture_output=True).returncode:
            if not os.path.isdir(folder):
                print(f"warning: no {folder}; run benchmarks/gpu_prepare.sh", file=sys.stderr)
            path.append(folder)
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run(step: Step, timeout: float, env: dict, log) -> str:
    """The step's command in a process group of its own, all of which a timeout ends."""
    log.write(f"\n== {step.name} (timeout {timeout:.0f} s)\n$ {' '.join(step.command)}\n")
    log.flush()
    proc = subprocess.Popen(step.command, cwd=common.REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        rc = proc.wait(timeout=timeout)
        return "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timeout ({timeout:.0f} s)"


def run_all(args, sizes: SimpleNamespace, log) -> list[dict]:
    env = step_environment()
    log.write(f"PYTHONPATH={env['PYTHONPATH']}\n")
    deadline = time.monotonic() + (args.budget or sizes.budget_s)
    rows = []
    for step in commands(sizes, args.device, args.work):
        timeout = min(step.cap_s * sizes.cap_scale, deadline - time.monotonic())
        row = {"step": step.name, "command": step.command, "figures": {}, "seconds": 0}
        rows.append(row)
        if step.name not in args.steps:
            row["status"] = "skipped (not chosen)"
        elif step.cuda_only and args.device == "cpu":
            row["status"] = "skipped (no CUDA)"
        elif timeout < 10:
            row["status"] = "skipped (out of time)"
        else:
            print(f"== {step.name} (timeout {timeout:.0f} s)", flush=True)
            begin = time.monotonic()
            row["status"] = run(step, timeout, env, log)
            row["seconds"] = round(time.monotonic() - begin)
            read = junit_counts if step.output.endswith(".xml") else common.read_json
            row["figures"] = read(os.path.join(args.work, step.output or f"{step.name}.json")) or {}
            print(f"   {row['status']} in {row['seconds']} s", flush=True)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "output/gpu_check"))
    p.add_argument("--work", default="/tmp/gpu_check_work", help="emptied at the start")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy sizes, for a small CPU")
    p.add_argument("--steps", type=lambda t: t.split(","), default=STEP_NAMES, help="a subset")
    p.add_argument("--budget", type=int, help="overall deadline in s (default: 480, tiny 1500)")
    args = p.parse_args(argv)
    if set(args.steps) - set(STEP_NAMES):
        p.error(f"--steps: the steps are {','.join(STEP_NAMES)}")
    args.work = os.path.abspath(args.work)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    with open(os.path.join(args.out, "gpu_check.log"), "w") as log:
        rows = run_all(args, TINY if args.tiny else FULL, log)
    defaults = cuda_defaults({r["step"]: r["figures"] for r in rows})
    total = round(time.monotonic() - started)
    table = [[r["step"], r["status"], key_figures(r["step"], r["figures"]), r["seconds"]]
             for r in rows]  # fmt: skip
    title = f"\nGPU check ({'tiny, ' if args.tiny else ''}device {args.device}), {total} s in all"
    common.print_table(["step", "status", "key figures", "seconds"], table, title)
    print("\nCUDA defaults the figures support, and the targets:")
    for line in defaults or ["(no figures)"]:
        print(f"  {line}")
    summary = {"device": args.device, "tiny": args.tiny, "total_s": total, "work": args.work}
    summary.update(steps=rows, defaults_and_targets=defaults)
    common.write_json(os.path.join(args.out, "summary.json"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
