"""Logging of a training run (pretraining or lincls): console lines that do not break the tqdm
bar, plus ``log.txt``; and the metric names both tools log, plot and write to JSON."""

import logging
import os
import sys

from tqdm import tqdm

LOGGER = "moco_d2"  # parent of moco_d2.pretrain and moco_d2.lincls: one setup serves both

# Metric names: keys of the returned stats and of results.json, and TensorBoard tags.
LOSS = "loss"
ACC1 = "acc1"
ACC5 = "acc5"
LR = "lr"
IMG_PER_S = "img_per_s"
TRAIN_LOSS = "train_loss"
TRAIN_ACC1 = "train_acc1"


class TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a log line never splits a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill training
            self.handleError(record)


def setup_logging(output_dir: str | None, is_main: bool) -> list[logging.Handler]:
    """Attach handlers to the ``moco_d2`` logger; return them for :func:`teardown_logging`.

    The main process logs INFO to the console and appends to ``output_dir/log.txt``; other ranks
    only show warnings.
    """
    root = logging.getLogger(LOGGER)
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
    root = logging.getLogger(LOGGER)
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
