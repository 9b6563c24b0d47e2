"""What a sweep's folder (OUT) holds, and whether it belongs to this sweep: read before anything is written.

OUT holds ``sweep.yaml`` (the settings, compared on every rerun), ``results.sqlite`` (the finished points),
``analysis/`` (the distances, measured once) and, while healings run, ``points/``. ``sweep --force`` builds
the new sweep beside OUT (:func:`force_dir`) and puts it in place only once complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import DepthpruneError
from ..measure.distances import AngularDistances, load_distances
from ..outputs import TEMP_MARK, remove_stale_temporaries
from .config import SweepConfig
from .settings import _changed_settings
from .store import read_finished

SETTINGS_FILE = "sweep.yaml"
ANALYSIS_DIR = "analysis"


def force_dir(out: Path) -> Path:
    """Where ``sweep --force`` builds the new sweep: beside OUT, resumable, renamed to OUT once complete."""
    return out.parent / f".{out.name}.depthprune-force"


@dataclass
class State:
    """What a run finds in its folder, read before anything is written."""

    done: set[str] = field(default_factory=set)
    distances: AngularDistances | None = None
    discard: bool = False  # an earlier --force folder that cannot be resumed: start it over


def holds_anything(folder: Path) -> bool:
    # Temporaries of a killed run do not count: setup removes them.
    return folder.is_dir() and any(TEMP_MARK not in entry.name for entry in folder.iterdir())


def _check_settings(c: SweepConfig, work: Path) -> None:
    path = work / SETTINGS_FILE
    if not path.is_file():
        raise DepthpruneError(f"output directory '{work}' exists and does not hold a sweep: choose another --out, "
                              "or pass --force to replace it")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        saved = exc
    if not isinstance(saved, dict):
        raise DepthpruneError(f"'{path}' is not a readable sweep record: pass --force to start the sweep over, "
                              f"or delete '{work}'")
    changed = _changed_settings(saved, c)
    if changed:
        raise DepthpruneError(f"'{work}' holds a sweep with other settings ({', '.join(changed)}): rerun with the "
                              "same settings to resume, choose another --out, or pass --force to start over")


def _read_analysis(work: Path) -> AngularDistances | None:
    folder = work / ANALYSIS_DIR
    if not (folder / "distances.json").is_file():
        return None
    hint = f"delete '{folder}' to measure the distances again, or pass --force to start the sweep over"
    try:
        distances = load_distances(folder)
    except DepthpruneError as exc:
        raise DepthpruneError(f"{exc}: {hint}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DepthpruneError(f"'{folder / 'distances.json'}' is not a readable distances file "
                              f"({type(exc).__name__}): {hint}") from None
    shape = distances.pairwise.shape
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
        raise DepthpruneError(f"'{folder / 'distances.json'}' holds no square matrix of distances: {hint}")
    return distances


def read_state(c: SweepConfig, work: Path, force: bool) -> State:
    """Check what ``work`` holds (settings, results, analysis) belongs to this sweep; read only."""
    if not holds_anything(work):
        return State()
    try:
        _check_settings(c, work)
        return State(done=read_finished(work), distances=_read_analysis(work))
    except DepthpruneError:
        if force:  # the folder of an interrupted --force run with other settings, or damaged: it is ours
            return State(discard=True)
        raise


def check_analysis_fits(distances: AngularDistances | None, total: int, work: Path) -> None:
    if distances is not None and distances.num_layers != total:
        raise DepthpruneError(f"'{work / ANALYSIS_DIR}' holds the distances of a {distances.num_layers}-layer model, "
                              f"but the model has {total} layers: delete '{work / ANALYSIS_DIR}' to measure them "
                              "again, or pass --force to start the sweep over")


def remove_temporaries_under(root: Path) -> None:
    """Remove what killed runs left under ``root``: every temporary of a process that no longer runs."""
    targets = {p.parent / p.name[1:p.name.index(TEMP_MARK)] for p in root.rglob(f".*{TEMP_MARK}*")}
    for target in sorted(targets):
        remove_stale_temporaries(target)
