"""The detectron2 install step: reports what is there, verifies what it downloads, fails clearly."""

import importlib.util
import io
import os
import subprocess
import sys
import tarfile

import pytest

from moco_d2 import install_detectron2 as inst


def test_reports_the_installed_build():
    """The pure-Python PyPI sdist, or an official build whose folder holds the compiled _C."""
    folder = os.path.dirname(importlib.util.find_spec("detectron2").origin)
    compiled = any(name.startswith("_C.") for name in os.listdir(folder))
    line = inst.describe()
    assert line.startswith("detectron2 0.6 ") and line.endswith(f" at {folder}")
    if compiled:
        assert "(compiled build with C++ ops)" in line
    else:
        assert "pb1-detectron2==0.6" in line and "no C++ ops" in line


def test_check_command_prints_version_and_source():
    result = subprocess.run(
        [sys.executable, "-m", "moco_d2.install_detectron2", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == inst.describe()


def test_install_is_a_no_op_when_detectron2_imports():
    assert inst.ensure_installed() == inst.describe()


def test_local_sdist_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        data = b"print('not detectron2')\n"
        info = tarfile.TarInfo("pb1-detectron2-0.6/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv(inst.SDIST_ENV, str(fake))
    with pytest.raises(inst.InstallError, match="sha256 .* does not match"):
        inst.fetch_sdist(str(tmp_path))


def test_missing_local_sdist_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(inst.SDIST_ENV, str(tmp_path / "absent.tar.gz"))
    with pytest.raises(inst.InstallError, match="absent.tar.gz is not a file"):
        inst.fetch_sdist(str(tmp_path))


def test_sdist_without_the_package_is_refused(tmp_path):
    sdist = tmp_path / "empty.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("pb1-detectron2-0.6/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(inst.InstallError, match="has no detectron2/ package"):
        inst.install_from_sdist(str(sdist), str(tmp_path / "work"))


HIDE_DETECTRON2 = "import sys; sys.modules['detectron2'] = None; "


def test_moco_d2_imports_without_detectron2():
    code = HIDE_DETECTRON2 + (
        "import moco_d2, moco_d2.pretrain, moco_d2.lincls, moco_d2.convert.tool; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tool_without_detectron2_says_what_to_run_in_one_line():
    tool = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "tools",
        "train_net.py",
    )
    code = HIDE_DETECTRON2 + (
        f"sys.argv = [{tool!r}]; import runpy; runpy.run_path({tool!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: detectron2 is not installed: run `make install` "
        "(or `python -m moco_d2.install_detectron2`)"
    ]
