"""Logging for a pretraining run: console lines that do not break the tqdm bar, plus log.txt."""

import logging
import os
import sys

from tqdm import tqdm

LOGGER = "moco_d2.pretrain"


class TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill training
            self.handleError(record)


def setup_logging(output_dir: str | None, is_main: bool) -> list[logging.Handler]:
    """Attach handlers to the ``moco_d2.pretrain`` logger; return them for the caller to detach.

    The main process logs INFO to the console and appends to ``output_dir/log.txt``; other ranks
    only print warnings.
    """
    root = logging.getLogger(LOGGER)
    root.setLevel(logging.INFO)
    console = TqdmHandler()
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    handlers = [console]
    if output_dir is not None:
        file_handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        file_handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        root.addHandler(handler)
    return handlers


def teardown_logging(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger(LOGGER)
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
