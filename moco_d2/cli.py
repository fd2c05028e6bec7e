"""What every tool in tools/ shares: argument types, the one-line error, the relay of that line
from spawned processes, and the training tools' logging."""

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from moco_d2.errors import DETECTRON2_MISSING, UserError

USER_ERROR_EXIT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a :class:`UserError`: one line and exit 2 through
    :func:`run_tool`, like every other bad input, instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def _checked(cast: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")


def run_tool(module_name: str, argv: list[str] | None = None) -> NoReturn:
    """Run ``module_name.main(argv)``; a :class:`UserError` becomes one line on stderr, exit 2."""
    try:
        module = importlib.import_module(module_name)
        status = module.main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = USER_ERROR_EXIT
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("detectron2"):
            raise
        print(f"error: {DETECTRON2_MISSING}", file=sys.stderr)
        status = USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    sys.exit(status or 0)


def spawn(fn: Callable, nprocs: int, args: tuple = ()) -> None:
    """``mp.spawn(fn, nprocs, args)`` for the training tools: a :class:`UserError` in any process
    ends the run as this process's own one line (the first one reported, so an error that every
    rank meets is said once), instead of mp.spawn's traceback of the worker."""
    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").SimpleQueue()
    # mp.spawn logs each process it ends after another failed; the error line suffices.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        mp.spawn(_report_user_errors, nprocs=nprocs, args=(errors, fn, args), daemon=False)
    except mp.ProcessExitedException:
        if errors.empty():
            raise
        raise UserError(errors.get()) from None


def _report_user_errors(local_rank: int, errors: Any, fn: Callable, args: tuple) -> None:
    try:
        fn(local_rank, *args)
    except UserError as e:
        errors.put(str(e))
        sys.exit(USER_ERROR_EXIT)


class TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a log line never splits a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill training
            self.handleError(record)


def setup_logging(output_dir: str | None, is_main: bool) -> list[logging.Handler]:
    """The training tools' ``moco_d2`` logger: INFO on the main process's console and in
    ``output_dir/log.txt``; other ranks show warnings only. Returns the handlers to close."""
    root = logging.getLogger("moco_d2")
    root.setLevel(logging.INFO)
    console = TqdmHandler()
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if output_dir is not None:
        file_handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        file_handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        root.addHandler(handler)
    return handlers


def teardown_logging(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger("moco_d2")
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
