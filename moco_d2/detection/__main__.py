"""``python -m moco_d2.detection``: the same command as tools/train_net.py, for subprocesses."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.detection.train_net")
