"""What every tool in tools/ shares: argument types, the one-line error, the relay of that line
from spawned processes, and the training tools' logging."""

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from moco_d2.errors import DETECTRON2_MISSING, EveryRankError, UserError

USER_ERROR_EXIT = 2
# How long a rank other than 0 waits, after an EveryRankError, for rank 0 to report it and the
# launcher to end the other processes, before it reports the error itself.
REPORT_GRACE_S = 60.0


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


def report_user_errors(fn: Callable, *args: Any) -> None:
    """Run ``fn(*args)`` in a spawned process: a :class:`UserError` is printed there as the tools'
    one line and the process exits 2, which :func:`spawn` turns into the launcher's exit 2
    (instead of mp.spawn's traceback). An :class:`EveryRankError` is printed by rank 0 alone,
    unless the launcher has not ended the other ranks after ``REPORT_GRACE_S``."""
    try:
        fn(*args)
    except UserError as e:
        import torch.distributed as dist

        if isinstance(e, EveryRankError) and dist.is_initialized() and dist.get_rank() != 0:
            time.sleep(REPORT_GRACE_S)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


def spawn(fn: Callable, nprocs: int, args: tuple = ()) -> None:
    """``mp.spawn(fn, args)`` with :func:`report_user_errors` in every process: a process that
    printed its one-line error ends this one with exit 2 and nothing more."""
    import torch.multiprocessing as mp

    # mp.spawn logs each process it ends after another failed; the error line suffices.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        mp.spawn(_spawned, nprocs=nprocs, args=(fn, args), daemon=False)
    except mp.ProcessExitedException as e:
        if e.exit_code != USER_ERROR_EXIT:
            raise
        raise SystemExit(USER_ERROR_EXIT) from None


def _spawned(local_rank: int, fn: Callable, args: tuple) -> None:
    report_user_errors(fn, local_rank, *args)


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
