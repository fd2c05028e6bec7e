#!/usr/bin/env python
"""Run the VOC transfer N times with different seeds; report mean ± std of AP, AP50, AP75."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.detection.trials")
