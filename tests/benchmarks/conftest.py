"""The benchmarks run as scripts from benchmarks/; their tests import them the same way."""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")
sys.path.insert(0, os.path.abspath(BENCHMARKS))
