#!/usr/bin/env python
"""Fine-tune and evaluate Faster R-CNN R50-C4 on Pascal VOC (see docs/transfer.md)."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.detection.train_net")
