"""benchmarks/gpu_check.py: every command it runs parses with its script's or tool's own parser
and writes where the runner reads, its CUDA test selection keeps every CUDA test, its runner
writes what it promises, and its defaults follow from the figures.

What this cannot catch: a step that fails at run time on a GPU. ``--device cpu --tiny`` runs
every step end to end (docs/speed.md), but takes many minutes on 2 cores, so it is run by hand.
"""

import glob
import importlib
import json
import os
import subprocess
import sys
import textwrap

import common
import gpu_check

REPO = common.REPO


def _steps(tmp_path):
    """Each mode's steps by name; the JPEG folders they read exist (the tool checks its own)."""
    common.make_jpeg_folder(str(tmp_path / "jpegs_half"), 1, size=(32, 32))
    for sizes in (gpu_check.FULL, gpu_check.TINY):
        for device in ("cuda", "cpu"):
            yield (
                sizes,
                device,
                {s.name: s for s in gpu_check.commands(sizes, device, str(tmp_path))},
            )


def _parsed(step):
    """The step's benchmark script and its parsed arguments."""
    script = os.path.basename(step.command[1])[: -len(".py")]
    module = importlib.import_module(script)
    return script, module.parse_args(step.command[2:])


def test_every_benchmark_command_parses_and_writes_where_the_runner_reads(tmp_path):
    for sizes, device, steps in _steps(tmp_path):
        assert list(steps) == gpu_check.STEP_NAMES
        for name, step in steps.items():
            if step.command[1].startswith("benchmarks/"):
                _, args = _parsed(step)
                assert args.json == str(tmp_path / f"{name}.json") and not step.output
        for name in ("e2e", "e2e_other_decode", "dali", "augment", "feeds", "step"):
            bench = _parsed(steps[name])[1]
            assert (bench.batch_size, bench.crop_size, bench.arch) == (
                sizes.batch,
                sizes.crop,
                sizes.arch,
            )
            assert bench.data == str(tmp_path / "jpegs") and bench.device == device
        assert _parsed(steps["e2e"])[1].modes == ["released", "fast"]
        other = _parsed(steps["e2e_other_decode"])[1]
        assert other.modes == ["fast"] and other.decode_on == (
            "loader" if device == "cuda" else "device"
        )
        assert _parsed(steps["step"])[1].modes == ["steps"]
        assert _parsed(steps["dali"])[1].modes == ["dali"]
        assert _parsed(steps["feeds"])[1].modes == ["feeds"]
        decode = _parsed(steps["decode"])[1]
        assert decode.device == device and decode.batch_size == sizes.batch
        for name, fmt in (("split_bn", "channels_last"), ("split_bn_nchw", "nchw")):
            split = _parsed(steps[name])[1]
            assert split.resnet50 == [sizes.batch, sizes.crop] and split.format == [fmt]
            assert split.compile == (fmt == "channels_last")
        jpegs = _parsed(steps["jpegs"])[1]
        assert jpegs.parts * jpegs.per_part == sizes.jpeg_parts * sizes.per_part
        assert steps["tests"].cuda_only and steps["tests"].output == "tests.xml"
        assert str(tmp_path / "tests.xml") in steps["tests"].command


def test_tool_commands_parse_with_the_tools_parsers(tmp_path):
    from moco_d2.demo.main import parse as demo_args
    from moco_d2.detection.train_net import argument_parser

    for sizes, device, steps in _steps(tmp_path):
        cli = _parsed(steps["cli"])[1].tool  # parsed by tools/pretrain_moco.py's parser
        assert cli.multiprocessing_distributed and cli.world_size == 1 and cli.epochs == 2
        assert cli.amp == (device == "cuda") and cli.data == str(tmp_path / "jpegs_half")
        assert (cli.batch_size, cli.crop_size, cli.arch) == (sizes.batch, sizes.crop, sizes.arch)
        demo = steps["demo"]
        assert demo.command[1] == "tools/demo.py" and demo.output == "demo/comparison.json"
        assert demo_args(demo.command[2:]).output_dir == str(tmp_path / "demo")
        train_net = _parsed(steps["train_net"])[1]
        assert tuple(train_net.voc) == sizes.voc
        train_net = common.tool_arguments(train_net)
        assert argument_parser().parse_args(train_net).config_file == "configs/voc_R50_C4.yaml"


def test_train_net_overrides_are_keys_of_the_voc_config(tmp_path):
    from detectron2.config import get_cfg

    import moco_d2.detection  # noqa: F401  (patches detectron2 0.6 before its config loads)

    for _, device, steps in _steps(tmp_path):
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(REPO, "configs", "voc_R50_C4.yaml"))
        options = common.tool_arguments(_parsed(steps["train_net"])[1])[4:]
        cfg.merge_from_list(options)  # raises on a key the config does not have
        assert cfg.SOLVER.AMP.ENABLED == (device == "cuda") and cfg.MODEL.DEVICE == device


def test_cuda_test_selection_keeps_every_test_that_needs_cuda(tmp_path):
    """Collect with the script's -k expression; no deselected test may carry a CUDA skipif."""
    (tmp_path / "cuda_probe.py").write_text(
        textwrap.dedent(
            f"""
            import json

            def _needs_cuda(item):
                return any("CUDA" in str(m.kwargs.get("reason", ""))
                           for m in item.iter_markers("skipif"))

            deselected = []

            def pytest_deselected(items):
                deselected.extend(i.nodeid for i in items if _needs_cuda(i))

            def pytest_collection_finish(session):
                with open({str(tmp_path / "probe.json")!r}, "w") as f:
                    json.dump({{"needs_cuda": [i.nodeid for i in session.items
                                              if _needs_cuda(i)],
                               "deselected_needing_cuda": deselected}}, f)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-q", "--collect-only", "-k"]
        + [gpu_check.CUDA_TESTS, "-p", "cuda_probe", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["deselected_needing_cuda"] == []
    assert probe["needs_cuda"], "no test with a CUDA skipif was selected"


def test_runner_writes_the_summary_and_one_log(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--device"]
    command += ["cpu", "--tiny", "--steps", "env,jpegs", "--out", str(out), "--work", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.log", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    status = {r["step"]: r["status"] for r in summary["steps"]}
    assert list(status) == gpu_check.STEP_NAMES
    assert status["env"] == status["jpegs"] == "ok"
    assert {s for k, s in status.items() if k not in ("env", "jpegs")} == {"skipped (not chosen)"}
    jpegs = next(r for r in summary["steps"] if r["step"] == "jpegs")["figures"]
    tiny = gpu_check.TINY
    assert jpegs["jpegs"] == tiny.jpeg_parts * tiny.per_part
    assert len(list((work / "jpegs").rglob("*.jpg"))) == jpegs["jpegs"]
    half = glob.glob(str(work / "jpegs_half" / "*" / "photos" / "*.jpg"))  # through the links
    assert len(half) == jpegs["half_jpegs"] == 16
    assert "GPU check (tiny, device cpu)" in result.stdout
    assert f"| jpegs | ok | {jpegs['summary']} |" in result.stdout


def _variant(bn_splits, compiled, channels_last, rate, first_s=1.0):
    return {
        "bn_splits": bn_splits,
        "compile": compiled,
        "channels_last": channels_last,
        "step_img_per_s": rate,
        "first_step_s": first_s,
    }


FIGURES = {
    "e2e": {
        "fast": {
            "img_per_s": 3100.0,
            "decode_on": "device",
            "host_ms_per_img": 0.3,
            "main_process_cpu_ms_per_img": 0.4,
        },
        "ratio_img_per_s": 3.2,
    },
    "e2e_other_decode": {"fast": {"img_per_s": 2500.0, "decode_on": "loader"}},
    "dali": {"dali": {"img_per_s": 2800.0}},
    "step": {
        "steps": [
            _variant(8, False, True, 2800.0),
            _variant(1, False, True, 3200.0),
            _variant(8, True, True, 3300.0, first_s=90.0),
            _variant(1, True, True, 3400.0, first_s=80.0),
            _variant(8, False, False, 2600.0),
            _variant(1, False, False, 2700.0),
        ]
    },
}


def test_defaults_follow_the_figures():
    lines = gpu_check.cuda_defaults(FIGURES)
    assert lines[0].startswith("--decode-on device ")
    # compiled beats the best eager variant (channels_last, 2,800) by more than 5%, and 90 s of
    # compiling is less than an ImageNet epoch at 3,300 img/s
    assert lines[1].startswith("--channels-last --compile ")
    assert "step at --bn-splits 8 / 1, channels_last eager: 0.88x (target 0.95x: missed)" in lines
    assert "step at --bn-splits 8 / 1, channels_last compiled: 0.97x (target 0.95x: met)" in lines
    assert "step at --bn-splits 8 / 1, NCHW eager: 0.96x (target 0.95x: met)" in lines
    assert "fast end to end 3100 img/s (target 3,000: met)" in lines
    assert "fast/released 3.20x (target 3x: met)" in lines
    # against the peer, the faster --decode-on: 3,100 img/s (device)
    assert "fast/DALI 1.11x, DALI 2800 img/s (target >1x: met)" in lines
    assert "host CPU 0.70 ms/img (target 1.0: met)" in lines


def test_no_compile_default_when_it_does_not_win_clearly():
    figures = json.loads(json.dumps(FIGURES))
    figures["step"]["steps"][2]["step_img_per_s"] = 2900.0  # +3.6%: within noise
    figures["e2e_other_decode"]["fast"]["img_per_s"] = 3500.0
    lines = gpu_check.cuda_defaults(figures)
    assert lines[0] == "--decode-on loader (end to end 3100 with device, 3500 with loader)"
    assert "fast/DALI 1.25x, DALI 2800 img/s (target >1x: met)" in lines
    figures["dali"]["dali"]["img_per_s"] = 3600.0
    assert "fast/DALI 0.97x, DALI 3600 img/s (target >1x: missed)" in gpu_check.cuda_defaults(
        figures
    )
    assert lines[1].startswith("--channels-last (")


def test_every_step_has_a_table_line_even_when_it_measured_nothing():
    for step in gpu_check.STEP_NAMES:
        assert gpu_check.key_figures(step, {}) == ""
    assert gpu_check.key_figures("e2e", {"summary": "fast 1 img/s"}) == "fast 1 img/s"
    counts = {"passed": 5, "failures": 1, "errors": 1, "skipped": 2}
    assert gpu_check.key_figures("tests", counts) == "5 passed, 2 failed, 2 skipped"
    row = {"name": "random init", "metrics": {"AP50": {"mean": 12.345}}, "knn_top1": 30}
    assert gpu_check.key_figures("demo", {"rows": [row]}) == "random init AP50 12.3, kNN 30"
