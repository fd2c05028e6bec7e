"""Entry point shared by the scripts in tools/: import the command, run it, report user errors."""

import argparse
import importlib
import sys
from typing import NoReturn

from moco_d2.errors import DETECTRON2_MISSING, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a :class:`UserError`: one line and exit 2 through
    :func:`run_tool`, like every other bad input, instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def run_tool(module_name: str, argv: list[str] | None = None) -> NoReturn:
    """Run ``module_name.main(argv)``; a :class:`UserError` becomes one line on stderr, exit 2."""
    try:
        module = importlib.import_module(module_name)
        status = module.main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("detectron2"):
            raise
        print(f"error: {DETECTRON2_MISSING}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    sys.exit(status or 0)
