"""Checking a model before it loads: its files, and the pruning record of a pruned checkpoint."""

from __future__ import annotations

from pathlib import Path

from .load import check_checkpoint
from .record import read_record


def check_model(model, trust_remote_code: bool = False):
    """Check a model before loading it; returns its config when known now (a local checkpoint, a loaded model).

    Besides :func:`~depthprune.model.load.check_checkpoint`'s checks of config and weights, the
    ``depthprune.json`` of a pruned checkpoint must be readable: it is read after the work, and a damaged
    one must not waste it.
    """
    if not isinstance(model, str):
        return model.config
    config = check_checkpoint(model, trust_remote_code)
    if Path(model).expanduser().is_dir():
        read_record(Path(model).expanduser())
    return config
