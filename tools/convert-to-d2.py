#!/usr/bin/env python
"""Convert a MoCo pretraining checkpoint to Detectron2 weights: see moco_d2/convert/tool.py."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.convert.tool")
