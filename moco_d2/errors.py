"""Errors caused by the user's input, reported by the tools as one line and exit code 2."""

DETECTRON2_MISSING = (
    "detectron2 is not installed: run `make install` (or `python -m moco_d2.install_detectron2`)"
)


class UserError(Exception):
    """Bad input (a file, a folder, a flag): the message says what and where."""


class TrainingDiverged(UserError):
    """The loss, weights or BN statistics blew up: stopping beats writing garbage for days."""
