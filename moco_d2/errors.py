"""Errors caused by the user's input, reported by the tools as one line and exit code 2."""

DETECTRON2_MISSING = (
    "detectron2 is not installed: run `make install` (or `python -m moco_d2.install_detectron2`)"
)


class UserError(Exception):
    """Bad input (a file, a folder, a flag): the message says what and where."""


class EveryRankError(UserError):
    """A :class:`UserError` that every process meets alike (divergence, the same bad weights
    everywhere); only rank 0 prints it."""


class TrainingDiverged(EveryRankError):
    """The loss, weights or BN statistics blew up: stopping beats writing garbage for days."""
