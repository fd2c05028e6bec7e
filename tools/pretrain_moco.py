#!/usr/bin/env python
"""MoCo v2 / v1 pretraining (the released main_moco.py flags); see --help."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.pretrain.main")
