"""Atomic writes: all or nothing, and files get the permissions a plain open() would give."""

import os

import pytest

from moco_d2.io import atomic_path, atomic_write_text


def test_failure_leaves_neither_the_target_nor_a_temporary(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text("old", target)
    with pytest.raises(RuntimeError):
        with atomic_path(target):
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_permissions_follow_the_umask(tmp_path):
    atomic_write_text("x", tmp_path / "atomic.txt")
    (tmp_path / "plain.txt").write_text("x")
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777  # noqa: E731
    assert mode("atomic.txt") == mode("plain.txt")


def test_importing_the_module_leaves_the_umask_alone():
    import importlib

    import moco_d2.io as io

    previous = os.umask(0o027)
    try:
        importlib.reload(io)
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)


def test_permissions_follow_a_restrictive_umask_too(tmp_path):
    previous = os.umask(0o077)
    try:
        atomic_write_text("x", tmp_path / "atomic.txt")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == 0o600
