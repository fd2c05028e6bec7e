#!/usr/bin/env python
"""Linear classification of a pretrained backbone on ImageNet-style folders (see docs/lincls.md)."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.lincls.main")
