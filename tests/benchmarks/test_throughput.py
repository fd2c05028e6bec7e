"""benchmarks/pretrain_throughput.py runs both modes in one process and reports what it promises.

Speed is not asserted (it is what the benchmark is for); the report's shape and its FLOP count
are: the count is checked against an independent multiply-add count from forward hooks.
"""

import json
import os
import subprocess
import sys

import common
import pretrain_throughput as bench
import torch

KEYS = (
    "img_per_s",
    "step_img_per_s",
    "host_ms_per_img",
    "main_process_cpu_ms_per_img",
    "peak_mem_bytes",
    "gflops_per_img",
)
BN_SPLITS = 2  # the tool's default at batch 8, 64 px, ResNet-18 (4 images x 2x2 positions)


def _multiply_adds(model, crop):
    """Conv and Linear multiply-adds of one forward pass, counted from output shapes."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_output = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            total += output.numel() * per_output
        else:
            total += output.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, crop, crop))
    return total


def test_benchmark_reports_both_modes_with_a_correct_flop_count(tmp_path):
    out = tmp_path / "out.json"
    command = [
        sys.executable, os.path.join(common.REPO, "benchmarks", "pretrain_throughput.py"),
        "--device", "cpu", "-a", "resnet18", "--crop-size", "64", "-b", "8", "-j", "1",
        "--num-images", "16", "--warmup", "1", "--iters", "1", "--e2e-iters", "2",
        "--moco-k", "64", "--decode-on", "device", "--modes", "released,fast,augment",
        "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast/released" in result.stdout and "host ms per image" in result.stdout

    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    expected = 2 * 4 * _multiply_adds(common.encoder("resnet18"), 64) / 1e9  # q, k fwd + bwd
    for mode in ("released", "fast"):
        for key in KEYS:
            assert report[mode][key] > 0, (mode, key)
        assert abs(report[mode]["gflops_per_img"] / expected - 1) < 0.01
        assert report[mode]["steps_per_epoch"] == 2
        assert isinstance(report[mode]["epoch_overhead_s"], float)
    released, fast = report["released"], report["fast"]
    assert released["augment_on"] == "loader" and fast["augment_on"] == "device"
    assert released["decode_on"] == "loader" and fast["decode_on"] == "device"
    assert released["bn_splits"] == 1 and fast["bn_splits"] == BN_SPLITS
    assert not released["workers_kept_across_epochs"] and fast["workers_kept_across_epochs"]
    assert fast["step_img_per_s_bn_splits_1"] > 0 and "step_img_per_s_bn_splits_1" not in released
    assert "fast step with --bn-splits 1" in result.stdout
    assert report["augment_ms_per_img_view"] > 0
    ratio = f"fast/released x{fast['img_per_s'] / released['img_per_s']:.2f}"
    assert report["summary"].startswith(f"released {common.fmt(released['img_per_s'])} img/s")
    assert ratio in report["summary"] and "DeviceAugment" in report["summary"]


def test_step_variants_build_each_setting_as_the_tool_does(tmp_path):
    data = common.make_jpeg_folder(str(tmp_path), 8, size=(96, 72))
    argv = ["--device", "cpu", "-a", "resnet18", "--crop-size", "64", "-b", "8", "-j", "0"]
    args = bench.parse_args(argv + ["--warmup", "0", "--iters", "1", "--moco-k", "64"])
    variants = [(None, False, False), (1, False, True)]
    rows = bench.step_variants(args, torch.device("cpu"), data, 1.0, variants)
    assert [(r["bn_splits"], r["compile"], r["channels_last"]) for r in rows] == [
        (BN_SPLITS, False, False),
        (1, False, True),
    ]
    for r in rows:
        assert r["step_img_per_s"] > 0 and r["first_step_s"] > 0
        assert r["step_tflops"] == r["step_img_per_s"] / 1e3
