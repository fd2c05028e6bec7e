"""Atomic writes: all or nothing, and files get the permissions a plain open() would give."""

import os

import pytest

from moco_d2.utils.fileio import atomic_path, atomic_write_text


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
