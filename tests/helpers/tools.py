"""Running the tools as a user does (a subprocess), on a full disk too, and checking what a user
sees."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def tool(name, *args, env=None, timeout=300):
    """``python tools/<name> args`` from the repository root; its CompletedProcess."""
    command = [sys.executable, os.path.join(REPO, "tools", name), *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=REPO
    )


def assert_error(result, *names):
    """Exit 2, no traceback, and a last line ``error: ...`` that names each of ``names``."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr[-3000:]
    for name in names:
        assert str(name) in line, (name, line)
    assert "weights_only=False" not in line
    return line


def snapshot(directory):
    """name → bytes of every file under ``directory``: to show nothing earlier changed."""
    found = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def _unshare_works():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def on_full_disk(tmp_path, script, size="1m"):
    """Run ``script`` (sh) with ``$0`` a fresh tmpfs of ``size``, in a private mount namespace."""
    if not _unshare_works():
        pytest.skip("needs unshare -rm (user and mount namespaces) to make a full disk")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    command = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs $0 && {script}"]
    return subprocess.run(
        command + [str(mount)], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO
    )
