#!/usr/bin/env python
"""One unattended check of a GPU machine, in 8 minutes or less (docs/speed.md, "GPU check").

Measures what decides the CUDA defaults of ``tools/pretrain_moco.py`` and checks the CUDA paths,
by calling the benchmarks' own functions. Run from the repository root after
``benchmarks/gpu_prepare.sh`` has built ``.device/site/`` (the pure-Python packages a bare GPU
machine lacks):

    python3 benchmarks/gpu_check.py                     # --out output/gpu_check
    python3 benchmarks/gpu_check.py --device cpu --tiny  # every step at toy size, on a CPU

Steps, most important first; each runs as ``gpu_check.py --step NAME`` in its own process under
its own timeout, all within one deadline (``--budget``), and a failing step does not stop the
next:

    env        GPU, driver, torch/torchvision/CUDA/cuDNN/NCCL versions, imports
    jpegs      photo-like 500x375 JPEGs (pretrain_throughput.make_jpeg_folder), in parallel
    counts     benchmarks/step_cost.py: counted ops and bytes, predicted ms (no GPU needed)
    split_bn   SplitBatchNorm eager and compiled against BatchNorm2d on ResNet-50's 53 BN shapes
    step       the training step alone: --bn-splits 8 and 1, eager and --compile, and NCHW
    augment    DeviceAugment ms per view; batched JPEG decode (nvJPEG) ms per image
    e2e        pretrain_throughput.py released against fast, with both --decode-on paths, and
               the training process's CPU per image
    tests      the CUDA tests: pytest -k "gpu or cuda" (the gpu marker is a keyword too)
    train_net  50 iterations of tools/train_net.py at the VOC config's sizes, AMP on
    cli        2 epochs of tools/pretrain_moco.py with the released one-GPU flags
    demo       tools/demo.py

Then one table (step | status | key figures | seconds), the CUDA defaults the figures support,
and ``OUT/summary.json``. OUT holds two files, ``summary.json`` and ``gpu_check.log`` (every
step's output); JPEGs, checkpoints and the benchmarks' JSON go to ``--work``.
"""

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
SITE = os.path.join(REPO, ".device", "site")
# A one-rank NCCL process group hung on the H200 machine without these (docs/speed.md).
NCCL_ENV = {
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_CUMEM_ENABLE": "0",
}
CUDA_TESTS = "gpu or cuda"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode of the check runs at."""

    arch: str
    crop: int
    batch: int
    workers: int
    jpeg_parts: int
    per_part: int
    moco_k: int
    bn_splits: int  # the tool's default at this batch and crop
    bench: tuple[str, ...]  # extra pretrain_throughput.py flags
    demo: tuple[str, ...]  # extra tools/demo.py flags
    voc: tuple[int, int, int]  # synthetic VOC: train images, test images, image size
    detection: tuple[str, ...]  # train_net config overrides
    budget_s: int
    cap_scale: int  # multiplies every step's timeout


FULL = Sizes(
    arch="resnet50",
    crop=224,
    batch=256,
    workers=min(16, os.cpu_count() or 1),
    jpeg_parts=16,
    per_part=256,
    moco_k=65536,
    bn_splits=8,
    bench=(),
    demo=(),
    voc=(64, 8, 500),
    # the VOC config's input sizes, RPN top-k and ROI batch as they are; one GPU's batch
    detection=(
        "SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "50",
        "TEST.PRECISE_BN.NUM_ITER", "10", "DATALOADER.NUM_WORKERS", "8",
    ),
    budget_s=480,
    cap_scale=1,
)  # fmt: skip
TINY = Sizes(
    arch="resnet18",
    crop=64,
    batch=8,
    workers=2,
    jpeg_parts=4,
    per_part=8,
    moco_k=256,
    bn_splits=2,
    bench=("--warmup", "1", "--iters", "2", "--e2e-iters", "2"),
    demo=(
        "--pretrain-images", "16", "--pretrain-epochs", "1", "--pretrain-batch", "8",
        "--moco-k", "32", "--det-train-images", "4", "--det-test-images", "2", "--max-iter", "2",
    ),
    voc=(8, 2, 96),
    detection=(
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "TEST.PRECISE_BN.NUM_ITER", "2",
        "DATALOADER.NUM_WORKERS", "1",
    ),
    budget_s=1500,
    cap_scale=3,
)  # fmt: skip


@dataclasses.dataclass
class Context:
    """What every step knows: the mode's sizes, the device, and where files go."""

    sizes: Sizes
    device: str
    work: str
    python: str

    @property
    def cuda(self) -> bool:
        return self.device != "cpu"

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def bench_flags(self) -> list[str]:
        """pretrain_throughput.py's flags for this mode's sizes and the generated JPEGs."""
        s = self.sizes
        return [
            "-a", s.arch, "--crop-size", str(s.crop), "-b", str(s.batch), "-j", str(s.workers),
            "--device", self.device, "--moco-k", str(s.moco_k), "--data", self.path("jpegs"),
            "--num-images", str(s.jpeg_parts * s.per_part), *s.bench,
        ]  # fmt: skip

    def save(self, name: str, figures: dict) -> dict:
        """Write a step's figures so far: what a step measured survives its timeout."""
        with open(self.path(f"{name}.json"), "w") as f:
            json.dump(figures, f, indent=2)
        return figures

    def run(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        """A tool of the project, its output going to this step's log."""
        print("$", " ".join(command), flush=True)
        return subprocess.run(command, cwd=REPO, check=True, **kwargs)


def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _throughput():
    sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("pretrain_throughput")


# ---- the steps: each returns its key figures (JSON-able) ---------------------------------------


def step_env(ctx: Context) -> dict:
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], check=False)
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
        "compiler": shutil.which("g++") or shutil.which("cc"),
    }
    missing = []
    for module in ("moco_d2.detection", "detectron2", "fvcore.nn", "pycocotools._mask"):
        try:
            importlib.import_module(module)
        except Exception as e:  # report every missing piece, not only the first
            missing.append(f"{module}: {type(e).__name__}: {e}")
    info["import_errors"] = missing
    print(json.dumps(info, indent=2))
    if missing or (ctx.cuda and not cuda):
        ctx.save("env", info)
        raise SystemExit(1)
    return info


def step_jpegs(ctx: Context) -> dict:
    make_jpeg_folder = _throughput().make_jpeg_folder
    s = ctx.sizes
    folders = [ctx.path("jpegs", f"part{k:02d}") for k in range(s.jpeg_parts)]
    with ProcessPoolExecutor(min(s.jpeg_parts, os.cpu_count() or 1)) as pool:
        list(pool.map(make_jpeg_folder, folders, [s.per_part] * s.jpeg_parts, range(s.jpeg_parts)))
    os.makedirs(ctx.path("jpegs_cli"), exist_ok=True)
    for folder in folders[: s.jpeg_parts // 2]:  # the CLI epochs read half of them
        os.symlink(folder, ctx.path("jpegs_cli", os.path.basename(folder)))
    return {"jpegs": s.jpeg_parts * s.per_part, "cli_jpegs": s.jpeg_parts // 2 * s.per_part}


def step_e2e(ctx: Context) -> dict:
    """Released against fast end to end (fast with the tool's --decode-on default), then fast
    with the other --decode-on."""
    bench = _throughput()
    default, other = ("device", "loader") if ctx.cuda else ("loader", "device")
    bench.main([*ctx.bench_flags(), "--json", ctx.path("e2e_default.json")])
    report = load_json(ctx.path("e2e_default.json"))
    figures = ctx.save("e2e", {"decode_default": default, "decode_other": other, **report})
    extra = ["--modes", "fast", "--decode-on", other, "--json", ctx.path("e2e_other.json")]
    bench.main([*ctx.bench_flags(), *extra])
    figures["fast_other_decode"] = load_json(ctx.path("e2e_other.json"))["fast"]
    return figures


def decode_argv(ctx: Context) -> list[str]:
    """decode_host_cost.py's flags: the run's batch and workers on the generated JPEGs."""
    s = ctx.sizes
    argv = ["--data", ctx.path("jpegs"), "-b", str(s.batch), "-j", str(s.workers)]
    argv += ["--crop-size", str(s.crop), "--device", ctx.device, "--num-images", "64"]
    return argv + ["--receive-batches", "3", "--wait", "1", "--json", ctx.path("decode.json")]


def split_bn_argv(ctx: Context, fmt: str) -> list[str]:
    """split_bn_overhead.py's flags: every BN shape of a ResNet-50 at the run's batch and crop,
    in the step's dtype; channels_last (the CUDA default) compiled too."""
    s = ctx.sizes
    argv = ["--device", ctx.device, "--dtype", "bf16" if ctx.cuda else "fp32"]
    argv += ["--resnet50", str(s.batch), str(s.crop), "--num-splits", str(s.bn_splits)]
    argv += ["--format", fmt, "--json", ctx.path(f"split_bn_{fmt}.json")]
    return argv + (["--compile"] if fmt == "channels_last" else [])


def step_augment(ctx: Context) -> dict:
    """DeviceAugment ms per view of a batch; the batched decode of --decode-on device (ms per
    image, and the training process's CPU per image receiving and decoding a batch)."""
    import torch

    sys.path.insert(0, BENCHMARKS)
    decode_host_cost = importlib.import_module("decode_host_cost")
    s = ctx.sizes
    sizes = argparse.Namespace(batch_size=s.batch, crop_size=s.crop)
    device = torch.device(ctx.device)
    figures = {"augment_ms_per_img_view": _throughput().device_augment_ms(sizes, device)}
    ctx.save("augment", figures)
    figures["decode"] = decode_host_cost.main(decode_argv(ctx))
    return figures


def step_split_bn(ctx: Context) -> dict:
    """SplitBatchNorm(8) against BatchNorm2d on every BN shape of a ResNet-50 at the run's batch
    and crop: channels_last eager and compiled, then NCHW eager."""
    sys.path.insert(0, BENCHMARKS)
    split_bn_overhead = importlib.import_module("split_bn_overhead")
    figures = {}
    for fmt in ("channels_last", "nchw"):
        split_bn_overhead.main(split_bn_argv(ctx, fmt))
        figures[fmt] = load_json(ctx.path(f"split_bn_{fmt}.json"))["resnet50"][fmt]
        ctx.save("split_bn", figures)
    return figures


def step_step(ctx: Context) -> dict:
    """The training step alone in the variants that decide the defaults (one at a time, each
    saved as it finishes)."""
    import torch

    bench = _throughput()
    args = bench.parse_args(ctx.bench_flags())
    device = torch.device(ctx.device)
    gflops = bench.gflops_per_image(args)
    rows = []
    for variant in bench.STEP_VARIANTS:
        rows += bench.step_variants(args, device, ctx.path("jpegs"), gflops, [variant])
        ctx.save("step", {"variants": rows})
    return {"variants": rows}


def step_tests(ctx: Context) -> dict:
    xml = ctx.path("tests.xml")
    command = [ctx.python, "-m", "pytest", "tests", "-q", "-k", CUDA_TESTS]
    command += ["-p", "no:cacheprovider", "--junitxml", xml]
    result = subprocess.run(command, cwd=REPO, check=False)
    counts = junit_counts(xml)
    if result.returncode:
        print(f"pytest exited {result.returncode}")
        raise SystemExit(1)
    return counts


def junit_counts(path: str) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def train_net_command(ctx: Context) -> list[str]:
    return [
        ctx.python, "tools/train_net.py", "--config-file", "configs/voc_R50_C4.yaml",
        "--num-gpus", "1", "MODEL.WEIGHTS", "", "MODEL.DEVICE", ctx.device,
        "SOLVER.AMP.ENABLED", str(ctx.cuda), "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "OUTPUT_DIR", ctx.path("train_net"),
        *ctx.sizes.detection,
    ]  # fmt: skip


def step_train_net(ctx: Context) -> dict:
    from moco_d2.detection.data.synthetic import make_synthetic_voc

    train, test, size = ctx.sizes.voc
    make_synthetic_voc(
        ctx.path("voc"),
        num_train=train,
        num_test=test,
        image_size=size,
        num_classes_used=20,
        max_objects=3,
    )
    env = dict(os.environ, DETECTRON2_DATASETS=ctx.path("voc"))
    log = ctx.path("train_net.out")
    with open(log, "w") as out:
        ctx.run(train_net_command(ctx), env=env, stdout=out, stderr=subprocess.STDOUT)
    with open(log) as f:
        text = f.read()
    print(text[-4000:])
    return train_net_figures(ctx.path("train_net", "metrics.json"), text)


def train_net_figures(metrics_path: str, log: str) -> dict:
    """s/iter: detectron2's metrics.json 'time' is the median of the last 20 iterations at each
    record (every 20 iterations and the last); records from iteration 39 on cover the iterations
    after the first 20. Plus the trainer's overall s/iter line and the peak memory."""
    records = []
    try:
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    timed = [r for r in records if "time" in r]
    late = [r for r in timed if r["iteration"] >= 39] or timed[-1:]
    figures = {"s_per_iter": None, "data_s_per_iter": None, "iterations": []}
    if late:
        figures["s_per_iter"] = statistics.mean(r["time"] for r in late)
        figures["data_s_per_iter"] = statistics.mean(r.get("data_time", 0) for r in late)
        figures["iterations"] = [max(1, late[0]["iteration"] - 18), late[-1]["iteration"] + 1]
    overall = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", log)
    figures["overall_s_per_iter"] = float(overall.group(2)) if overall else None
    memory = re.findall(r"max_mem: (\d+)M", log)
    figures["max_mem_mib"] = int(memory[-1]) if memory else None
    return figures


def cli_command(ctx: Context) -> list[str]:
    s = ctx.sizes
    command = [
        ctx.python, "tools/pretrain_moco.py", ctx.path("jpegs_cli"), "-a", s.arch,
        "-b", str(s.batch), "-j", str(s.workers), "--multiprocessing-distributed",
        "--world-size", "1", "--rank", "0", "--epochs", "2", "--moco-k", str(s.moco_k),
        "--crop-size", str(s.crop), "--output-dir", ctx.path("cli"), "--device", ctx.device,
    ]  # fmt: skip
    return command + (["--amp"] if ctx.cuda else [])


def step_cli(ctx: Context) -> dict:
    ctx.run(cli_command(ctx))
    with open(ctx.path("cli", "log.txt")) as f:
        return cli_figures(f.read())


STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+\] "


def _stamp(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def cli_figures(log: str) -> dict:
    """img/s per epoch as logged, each epoch's wall time between log lines, and the time an
    epoch spends outside its steps (wall minus images / img/s): the boundary cost."""
    run = re.search(STAMP + r"MoCo .*?(\d+) images, batch (\d+) per process x (\d+)", log, re.M)
    epochs = re.findall(STAMP + r"epoch (\d+)/\d+: .*?([\d.]+) img/s", log, re.M)
    previous = _stamp(run.group(1)) if run else None
    per_step = int(run.group(3)) * int(run.group(4)) if run else None
    images = int(run.group(2)) // per_step * per_step if run else None
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


def step_demo(ctx: Context) -> dict:
    command = [ctx.python, "tools/demo.py", "--device", ctx.device, "--output-dir"]
    ctx.run([*command, ctx.path("demo"), *ctx.sizes.demo])
    return (load_json(ctx.path("demo", "results.json")) or {}).get("results", {})


# Most important first: correctness, the end-to-end figures, then what decides the defaults.
STEPS = {
    "env": (45, step_env),
    "jpegs": (60, step_jpegs),
    "tests": (100, step_tests),
    "e2e": (130, step_e2e),
    "augment": (45, step_augment),
    "step": (220, step_step),
    "split_bn": (100, step_split_bn),
    "train_net": (90, step_train_net),
    "cli": (60, step_cli),
    "demo": (120, step_demo),
}
NEEDS_CUDA = {"tests"}


# ---- the report --------------------------------------------------------------------------------

IMAGENET_IMAGES = 1_281_167  # one epoch of ImageNet-1k train
TARGETS = {"img_per_s": 3000.0, "over_released": 3.0, "bn_splits_step": 0.95, "host_ms": 1.0}


def fmt(value, spec=None, unit=""):
    """``spec`` None: 0, 1 or 2 decimals for >= 100, >= 1, smaller (GPU and CPU rates alike)."""
    if value is None:
        return "n/a"
    if spec is None:
        spec = ".0f" if abs(value) >= 100 else ".1f" if abs(value) >= 1 else ".2f"
    return f"{value:{spec}}{unit}"


def _variant(figures: dict, bn_splits_default: bool, compiled: bool, channels_last: bool):
    for v in (figures.get("step") or {}).get("variants", []):
        default = v["bn_splits"] != 1
        if (default, v["compile"], v["channels_last"]) == (
            bn_splits_default,
            compiled,
            channels_last,
        ):
            return v
    return None


def describe(name: str, f: dict) -> str:
    """One line of key figures for a step's table row."""
    if not f:
        return ""
    if name == "env":
        return f"{f.get('gpu') or 'no GPU'}; torch {f.get('torch')}, cuDNN {f.get('cudnn')}"
    if name == "e2e":
        released, fast = f.get("released", {}), f.get("fast", {})
        other = f.get("fast_other_decode", {})
        return (
            f"img/s released {fmt(released.get('img_per_s'))}, fast {fmt(fast.get('img_per_s'))} "
            f"(decode {f.get('decode_default')}; {f.get('decode_other')}: "
            f"{fmt(other.get('img_per_s'))}); host+main CPU ms/img {fmt(_host_ms(fast), '.2f')}"
        )
    if name == "augment":
        decode = f.get("decode", {})
        return (
            f"augment {fmt(f.get('augment_ms_per_img_view'), '.4f')} ms/img/view; decode "
            f"{fmt(decode.get('decode_ms_per_img'), '.3f')} ms/img, receive "
            f"{fmt(decode.get('receive_ms_per_img'), '.3f')} ms/img CPU"
        )
    if name == "step":
        return "; ".join(
            f"bn-splits {v['bn_splits']} {'compiled' if v['compile'] else 'eager'} "
            f"{'cl' if v['channels_last'] else 'nchw'} {fmt(v['step_img_per_s'])}"
            for v in f.get("variants", [])
        )
    if name == "split_bn":
        return "; ".join(
            f"{fmt_name} x{fmt(r.get('ratio'), '.2f')}"
            + (f", compiled x{fmt(r['ratio_compiled'], '.2f')}" if "ratio_compiled" in r else "")
            for fmt_name, r in f.items()
        )
    if name == "tests":
        failed = f.get("failures", 0) + f.get("errors", 0)
        return f"{f.get('passed')} passed, {failed} failed, {f.get('skipped')} skipped"
    if name == "train_net":
        return f"{fmt(f.get('s_per_iter'), '.3f')} s/iter, max mem {f.get('max_mem_mib')} MiB"
    if name == "cli":
        return "; ".join(f"epoch {e['epoch']}: {fmt(e['img_per_s'])} img/s" for e in f["epochs"])
    if name == "demo":
        return "; ".join(f"{k} AP50 {fmt(r.get('AP50'), '.1f')}" for k, r in f.items())
    return ""


def _host_ms(fast: dict):
    """Host CPU per image of the fast path: the workers' and the training process's."""
    if fast.get("host_ms_per_img") is None or fast.get("main_process_cpu_ms_per_img") is None:
        return None
    return fast["host_ms_per_img"] + fast["main_process_cpu_ms_per_img"]


def cuda_defaults(figures: dict[str, dict]) -> list[str]:
    """The defaults the measured figures support, and the targets met or missed."""
    lines = []
    e2e = figures.get("e2e") or {}
    fast, other = e2e.get("fast", {}), e2e.get("fast_other_decode", {})
    if fast.get("img_per_s") and other.get("img_per_s"):
        best = (
            e2e["decode_default"]
            if fast["img_per_s"] >= other["img_per_s"]
            else e2e["decode_other"]
        )
        lines.append(
            f"--decode-on {best} (end to end {fmt(fast['img_per_s'])} with "
            f"{e2e['decode_default']}, {fmt(other['img_per_s'])} with {e2e['decode_other']})"
        )
    eager_cl = _variant(figures, True, False, True)
    eager_nchw = _variant(figures, True, False, False)
    compiled_cl = _variant(figures, True, True, True)
    candidates = {
        "--channels-last": eager_cl,
        "--no-channels-last": eager_nchw,
        "--channels-last --compile": compiled_cl,
    }
    rates = {k: v["step_img_per_s"] for k, v in candidates.items() if v}
    if rates:
        eager = {k: r for k, r in rates.items() if "--compile" not in k}
        best = max(eager, key=eager.get) if eager else None
        choice = best
        if compiled_cl and best and rates["--channels-last --compile"] >= 1.05 * rates[best]:
            epoch_s = IMAGENET_IMAGES / compiled_cl["step_img_per_s"]
            if compiled_cl["first_step_s"] < epoch_s:
                choice = "--channels-last --compile"
        lines.append(
            f"{choice} (step img/s at the default --bn-splits: "
            + ", ".join(f"{k} {fmt(r)}" for k, r in rates.items())
            + (
                f"; compiling took {fmt(compiled_cl['first_step_s'], '.0f')} s"
                if compiled_cl
                else ""
            )
            + ")"
        )
    for label, default_v, channels_last, compiled in (
        ("channels_last eager", eager_cl, True, False),
        ("channels_last compiled", compiled_cl, True, True),
        ("NCHW eager", eager_nchw, False, False),
    ):
        plain = _variant(figures, False, compiled, channels_last)
        if default_v and plain:
            ratio = default_v["step_img_per_s"] / plain["step_img_per_s"]
            met = "met" if ratio >= TARGETS["bn_splits_step"] else "missed"
            lines.append(
                f"step at --bn-splits {default_v['bn_splits']} / 1, {label}: {ratio:.2f}x "
                f"(target {TARGETS['bn_splits_step']}x: {met})"
            )
    if fast.get("img_per_s"):
        met = "met" if fast["img_per_s"] >= TARGETS["img_per_s"] else "missed"
        lines.append(f"fast end to end {fmt(fast['img_per_s'])} img/s (target 3,000: {met})")
    if e2e.get("ratio_img_per_s"):
        met = "met" if e2e["ratio_img_per_s"] >= TARGETS["over_released"] else "missed"
        lines.append(f"fast/released {e2e['ratio_img_per_s']:.2f}x (target 3x: {met})")
    host = _host_ms(fast)
    if host is not None:
        met = "met" if host <= TARGETS["host_ms"] else "missed"
        lines.append(f"host CPU {host:.2f} ms/img (target 1.0: {met})")
    return lines


def print_report(rows: list[dict], defaults: list[str], total_s: int, args) -> None:
    print(f"\nGPU check ({'tiny, ' if args.tiny else ''}device {args.device}), {total_s} s in all")
    widths = [max(len(r["step"]) for r in rows), max(len(r["status"]) for r in rows)]
    print(f"{'step':<{widths[0]}} | {'status':<{widths[1]}} | key figures | seconds")
    for r in rows:
        text = describe(r["step"], r["figures"])
        print(f"{r['step']:<{widths[0]}} | {r['status']:<{widths[1]}} | {text} | {r['seconds']}")
    print("\nCUDA defaults the figures support, and the targets:")
    for line in defaults or ["(no figures)"]:
        print(f"  {line}")


# ---- the runner --------------------------------------------------------------------------------


def step_environment() -> dict:
    """The steps' environment: the project first; .device/site only where this Python lacks what
    it holds (its pycocotools is built for Python 3.12)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", **NCCL_ENV)
    path = [REPO]
    probe = "import detectron2, fvcore, pycocotools._mask"
    has_all = subprocess.run(
        [sys.executable, "-c", probe], env=dict(env, PYTHONPATH=REPO), capture_output=True
    )
    if has_all.returncode:
        if not os.path.isdir(SITE):
            print("warning: no .device/site; run benchmarks/gpu_prepare.sh", file=sys.stderr)
        path.append(SITE)
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_steps(args, ctx: Context, log) -> list[dict]:
    env = step_environment()
    log.write(f"PYTHONPATH={env['PYTHONPATH']}\n")
    start = time.monotonic()
    rows = []
    budget = args.budget or ctx.sizes.budget_s
    for name, (cap, _) in STEPS.items():
        left = budget - (time.monotonic() - start)
        timeout = min(cap * ctx.sizes.cap_scale, left)
        row = {"step": name, "figures": {}, "seconds": 0}
        rows.append(row)
        if name not in args.steps:
            row["status"] = "skipped (not chosen)"
            continue
        if name in NEEDS_CUDA and not ctx.cuda:
            row["status"] = "skipped (no CUDA)"
            continue
        if timeout < 10:
            row["status"] = "skipped (out of time)"
            continue
        command = [sys.executable, os.path.abspath(__file__), "--step", name]
        command += ["--work", ctx.work, "--device", ctx.device] + (["--tiny"] if args.tiny else [])
        header = f"\n== {name} (timeout {timeout:.0f} s)\n"
        print(header.strip(), flush=True)
        log.write(header)
        log.flush()
        begin = time.monotonic()
        try:
            rc = subprocess.run(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
            row["status"] = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            row["status"] = f"timeout ({timeout:.0f} s)"
        row["seconds"] = round(time.monotonic() - begin)
        row["figures"] = load_json(ctx.path(f"{name}.json")) or {}
        print(f"   {row['status']} in {row['seconds']} s", flush=True)
    return rows


def run_one_step(name: str, ctx: Context) -> int:
    figures = STEPS[name][1](ctx)
    with open(ctx.path(f"{name}.json"), "w") as f:
        json.dump(figures, f, indent=2)
    return 0


def step_list(text: str) -> list[str]:
    chosen = [name for name in text.split(",") if name]
    unknown = [name for name in chosen if name not in STEPS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"steps are {', '.join(STEPS)}; got {text!r}")
    return chosen


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "output/gpu_check"))
    p.add_argument("--work", default="/tmp/gpu_check_work", help="emptied at the start")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy sizes, for a small CPU")
    p.add_argument("--steps", type=step_list, default=list(STEPS), help="comma-separated subset")
    p.add_argument(
        "--budget", type=int, help="overall deadline in seconds (default: 480, tiny 1500)"
    )
    p.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ctx = Context(
        TINY if args.tiny else FULL, args.device, os.path.abspath(args.work), sys.executable
    )
    if args.step:
        return run_one_step(args.step, ctx)
    shutil.rmtree(ctx.work, ignore_errors=True)
    os.makedirs(ctx.work)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    with open(os.path.join(args.out, "gpu_check.log"), "w") as log:
        rows = run_steps(args, ctx, log)
    figures = {r["step"]: r["figures"] for r in rows}
    defaults = cuda_defaults(figures)
    total = round(time.monotonic() - started)
    print_report(rows, defaults, total, args)
    summary = {
        "device": args.device,
        "tiny": args.tiny,
        "total_s": total,
        "work": ctx.work,
        "steps": rows,
        "defaults_and_targets": defaults,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"summary: {os.path.join(args.out, 'summary.json')}; log: {args.out}/gpu_check.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
