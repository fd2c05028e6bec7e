#!/usr/bin/env python
"""Pretrain → convert → fine-tune → AP table on built-in synthetic data (`make demo`)."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.demo.main")
