"""The serial executor: each point in turn, in the sweep's process, on the one loaded model."""

from __future__ import annotations

from pathlib import Path

from ...select import SelectionContext
from ..config import SweepConfig
from ..plan import Point
from ..point import record_point, run_point, select_point, stored_predictions
from ..progress import SweepProgress
from ..store import UNPRUNED


def run_points(model, tokenizer, c: SweepConfig, work: Path, db, todo: list[Point], total: int,
               context: SelectionContext, progress: SweepProgress, sequences: list[list[int]] | None = None) -> None:
    """Run and save each point of ``todo`` (the seam that :mod:`.ray` replaces by Ray tasks); a point that
    raises stops the sweep. ``sequences``: the calibration token ids of repaired points. The full model's
    point comes first: the choices it stores are every later point's reference (agreement)."""
    reference = stored_predictions(db)
    for point in todo:
        with progress.point(point.key):
            row = run_point(model, tokenizer, c, work, point, select_point(point, context), total, progress,
                            sequences, None if point.criterion == UNPRUNED else reference)
            record_point(c, work, db, row, progress)
        if point.criterion == UNPRUNED:
            reference = row["details"].get("predictions")
        progress.finished(point.key, row["details"]["seconds"])
