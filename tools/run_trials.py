#!/usr/bin/env python
"""Compare backbones: N detection trials each, mean ± std, and Welch verdicts (docs/transfer.md)."""

from moco_d2.cli import run_tool

if __name__ == "__main__":
    run_tool("moco_d2.trials.main")
