"""benchmarks/gpu_check.sh is valid bash and calls only entry points, flags, config keys and
functions that exist, and its CUDA-test selection includes every test that skips without CUDA.

What this cannot catch: a step that fails at run time (a wrong value, a crash on a GPU), or a
report that parses a log line the tools no longer print. The tiny CPU mode
(``GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1``) runs every step end to end, but takes minutes on
2 cores, so it is run by hand (docs/speed.md), not here.
"""

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def _script():
    with open(SCRIPT) as f:
        return re.sub(r"\\\n\s*", " ", f.read())  # one line per command


def _arrays(text):
    """Every bash array assignment ``NAME=(...)``: name -> tokens, both modes together."""
    arrays = {}
    for name, body in re.findall(r"\b(\w+)=\((.*?)\)[ \t]*(?:#[^\n]*)?$", text, re.M | re.S):
        arrays.setdefault(name, []).extend(shlex.split(body, comments=True))
    return arrays


def _commands(text):
    """``{tool: tokens}`` of every Python tool the script runs, arrays expanded."""
    arrays = _arrays(text)
    commands = {}
    for line in text.splitlines():
        match = re.search(r'"\$PYTHON" ((?:tools|benchmarks)/[\w-]+\.py)(.*)', line)
        if match:
            tokens = match.group(2).split()
            for name in re.findall(r"\$\{(\w+)\[@\]\}", match.group(2)):
                tokens += arrays[name]
            commands.setdefault(match.group(1), []).extend(tokens)
    return commands


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prepare.sh"])
def test_bash_syntax(script):
    result = subprocess.run(
        ["bash", "-n", os.path.join(REPO, "benchmarks", script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_flag_the_script_passes_is_in_the_tools_help():
    commands = _commands(_script())
    assert set(commands) == {
        "benchmarks/pretrain_throughput.py",
        "benchmarks/split_bn_overhead.py",
        "tools/pretrain_moco.py",
        "tools/demo.py",
        "tools/train_net.py",
    }
    env = dict(os.environ, PYTHONPATH=REPO)
    helps = {  # in parallel: each one imports torch
        tool: subprocess.Popen(
            [sys.executable, os.path.join(REPO, tool), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for tool in commands
    }
    for tool, tokens in commands.items():
        flags = {t for t in tokens if re.fullmatch(r"--[a-z][\w-]*", t)}
        assert flags, tool
        stdout, stderr = helps[tool].communicate()
        assert helps[tool].returncode == 0, (tool, stderr[-2000:])
        missing = {f for f in flags if not re.search(rf"{re.escape(f)}\b", stdout)}
        assert not missing, (tool, missing)


def test_train_net_config_keys_exist_in_the_voc_config():
    from detectron2.config import get_cfg

    import moco_d2.detection  # noqa: F401  (patches detectron2 0.6 before its config loads)

    tokens = _commands(_script())["tools/train_net.py"]
    keys = {t for t in tokens if CONFIG_KEY.match(t)}
    assert {"SOLVER.AMP.ENABLED", "SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH"} <= keys
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "voc_R50_C4.yaml"))
    for key in keys:
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_python_helpers_accept_the_arguments_the_script_passes():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from pretrain_throughput import make_jpeg_folder
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    from moco_d2.detection.data.synthetic import make_synthetic_voc

    text = _script()
    assert "make_jpeg_folder, folders, [per_part] * parts, range(parts)" in text
    inspect.signature(make_jpeg_folder).bind("root", 16, 0)
    (call,) = re.findall(r"make_synthetic_voc as m;\s+print\(m\((.*?)\)\)", text)
    names = re.findall(r"(\w+)=", call)
    assert "image_size" in names
    inspect.signature(make_synthetic_voc).bind("root", **dict.fromkeys(names, 1))


def test_cuda_test_selection_keeps_every_test_that_needs_cuda(tmp_path):
    """Collect with the script's -k expression; no deselected test may carry a CUDA skipif."""
    (selection,) = re.findall(r'pytest tests -q -k "([^"]+)"', _script())
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
                    json.dump({{"selected": [i.nodeid for i in session.items],
                               "needs_cuda": [i.nodeid for i in session.items
                                              if _needs_cuda(i)],
                               "deselected_needing_cuda": deselected}}, f)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-q", "--collect-only", "-k", selection]
        + ["-p", "cuda_probe", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["deselected_needing_cuda"] == []
    assert probe["needs_cuda"], "no test with a CUDA skipif was selected"
