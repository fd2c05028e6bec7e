#!/usr/bin/env python
"""Check a Pascal VOC tree (``check``) or write a small synthetic one (``synthetic``).

python datasets/prepare_voc.py check [--root datasets]
python datasets/prepare_voc.py synthetic --root datasets/synthetic --num-train 64
"""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.detection.data.prepare_voc")
