"""`depthprune results`: a sweep's points as a table for a terminal.

By default the columns people compare, each in one format (accuracies, losses and distances with 3 decimals,
fractions with 2, removed layers as ranges '13-18'), fitted to 160 characters: lower-priority columns are left
out and a footer line names them. ``every_column`` prints every column of the store, as the command always did.
Nothing here imports torch or matplotlib, so the command answers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DepthpruneError
from ..select import format_layers
from ..sweep.store import LAYER, NO_REPAIR, is_repaired, is_sublayer, table
from .stats import accuracy_tasks, agreement_tasks

WIDTH = 160  # characters of the default table, footer and failure lines
GAP = "  "


@dataclass(frozen=True)
class Column:
    """One column of the default table: its header, how a point's cell is written, whether it is text, and
    its rank (the columns ranked last are left out first when the table is too wide; None: never)."""

    header: str
    cell: Callable[[dict], str]
    text: bool = False  # text is aligned left, numbers right
    rank: float | None = None


def results_lines(directory: str | Path, points: list[dict], failed: dict[str, dict], every_column: bool = False,
                  width: int = WIDTH) -> list[str]:
    """The lines `depthprune results` prints: the table, then one line per point a sweep could not finish.

    Raises DepthpruneError (one line) when the store has no finished point: there is no table to show."""
    if not points:
        raise DepthpruneError(_no_points(directory, failed))
    if every_column:
        return _every_column(points) + [_failure(key, f) for key, f in failed.items()]
    return _compared_columns(points, width) + [_cut(_failure(key, f), width) for key, f in failed.items()]


def _no_points(directory: str | Path, failed: dict[str, dict]) -> str:
    if not failed:
        return (f"no finished points in '{directory}' yet: `depthprune sweep --out {directory}` adds each one "
                "as it finishes")
    key, first = next(iter(failed.items()))
    error = _cut(str(first["error"]).splitlines()[0] if first["error"] else "", 80)
    return (f"no finished points in '{directory}': {len(failed)} failed (first {key}: {error}); rerun the sweep to "
            "retry them")


def _failure(key: str, failure: dict) -> str:
    return f"failed: {key} ({failure['attempts']}x, last {failure['failed']}): {failure['error']}"


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, ending in '…' when it was longer."""
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the default table ----------------------------------------------------------------------------------


def _metric(key: str, digits: int, scale: float = 1.0) -> Callable[[dict], str]:
    """A point's ``key`` metric with ``digits`` decimals (after ``scale``), blank where it was not measured."""
    def cell(point: dict) -> str:
        value = point["metrics"].get(key)
        return "" if value is None else f"{value * scale:,.{digits}f}"

    return cell


def _columns(points: list[dict]) -> list[Column]:
    """The compared columns the store has, in the order shown: what the point is (its repair in a sweep with
    one), its distance, each task's headline accuracy, each multiple-choice task's agreement with the full
    model, the C4 loss, the cost, the healing's validation loss, and the point's wall and CPU seconds."""
    measured = {key for p in points for key, value in p["metrics"].items() if value is not None}
    tasks = [m for m in accuracy_tasks(points).values() if m in measured]
    agreed = [f"{t}_agreement" for t in agreement_tasks(points)]
    repair = [Column("repair", lambda p: p.get("repair", NO_REPAIR), text=True)] if is_repaired(points) else []
    finer = [Column("granularity", lambda p: p.get("granularity", LAYER), text=True)] if is_sublayer(points) else []
    columns = [Column("n", lambda p: str(p["n"])),
               *finer,
               Column("fraction", lambda p: f"{p['fraction']:.2f}"),
               Column("criterion", lambda p: p["criterion"], text=True),
               *repair,
               Column("heal", lambda p: p["heal"], text=True),
               Column("removed_layers", lambda p: format_layers(p["removed_layers"]), text=True)]
    if any(p["distance"] is not None for p in points):
        columns.append(Column("distance", lambda p: "" if p["distance"] is None else f"{p['distance']:.3f}",
                              rank=len(tasks) + 1))
    columns += [Column(m, _metric(m, 3), rank=1 + i) for i, m in enumerate(tasks)]
    # Left out before the accuracies, after the cost and the distance: agreement repeats what accuracy says
    # with less noise, the cost is the same for every repair and healing of a layer count.
    columns += [Column(m, _metric(m, 3), rank=len(tasks) + 0.5 + i / 100) for i, m in enumerate(agreed)]
    optional = [("c4_loss", "c4_loss", 3, 1.0, 0),
                ("prefill_ms_per_token", "prefill_ms_per_token", 2, 1.0, len(tasks) + 2),
                ("decode_ms_per_token", "decode_ms_per_token", 2, 1.0, len(tasks) + 3),
                ("weight_MiB", "weight_bytes", 1, 1 / 2**20, len(tasks) + 4),
                ("heal_val_loss", "heal_val_loss", 3, 1.0, len(tasks) + 5),
                ("params_removed", "params_removed", 3, 1.0, len(tasks) + 1.1),
                # after the distance, before the cost: what each repair and healing costs differs, the cost not
                ("wall_s", "wall_s", 0, 1.0, len(tasks) + 1.2),
                ("cpu_s", "cpu_s", 0, 1.0, len(tasks) + 1.3)]
    columns += [Column(header, _metric(key, digits, scale), rank=rank)
                for header, key, digits, scale, rank in optional if key in measured]
    return columns


def _compared_columns(points: list[dict], width: int) -> list[str]:
    """The table of the compared columns, fitted to ``width``, and a footer line on what it leaves out."""
    columns = _columns(points)
    cells = {c.header: [c.cell(p) for p in points] for c in columns}
    widths = {h: max(len(h), *(len(v) for v in column)) for h, column in cells.items()}

    def total(shown: list[Column]) -> int:
        return sum(widths[c.header] for c in shown) + len(GAP) * (len(shown) - 1)

    shown, left_out = list(columns), []
    for column in sorted((c for c in columns if c.rank is not None), key=lambda c: -c.rank):
        if total(shown) <= width:
            break
        shown.remove(column)
        left_out.insert(0, column.header)
    notes = [f"left out to fit {width} characters: {', '.join(left_out)}"] if left_out else []
    over = total(shown) - width
    if over > 0:  # only very long non-contiguous cuts get here: shorten the removed layers
        room = max(len("removed_layers"), widths["removed_layers"] - over)
        cells["removed_layers"] = [_cut(v, room) for v in cells["removed_layers"]]
        widths["removed_layers"] = room
        notes.append("removed_layers cut short")

    def line(texts: list[str]) -> str:
        return GAP.join(t.ljust(widths[c.header]) if c.text else t.rjust(widths[c.header])
                        for c, t in zip(shown, texts, strict=True)).rstrip()

    lines = [line([c.header for c in shown])]
    lines += [line([cells[c.header][i] for c in shown]) for i in range(len(points))]
    every = len(_shown_headers(points))
    # the notes are cut short where they must be, the hint to --all never
    head, hint = f"{len(shown)} of {every} columns", "; --all shows every column"
    said = f" ({_cut('; '.join(notes), width - len(head) - len(hint) - 3)})" if notes else ""
    lines.append(head + said + hint)
    return lines


# --- every column -----------------------------------------------------------------------------------------


def _shown_headers(points: list[dict]) -> list[str]:
    """The store's columns that `--all` shows: all but the chance levels (constants of each task)."""
    return [h for h in table(points)[0] if not h.endswith("_chance")]


def _every_column(points: list[dict]) -> list[str]:
    """Every column of the store but the chance levels, right-aligned, numbers to 4 significant digits."""
    header, rows = table(points)
    shown = _shown_headers(points)
    cells = [[_cell(v) for h, v in zip(header, row, strict=True) if h in shown] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(shown)]
    return ["  ".join(h.rjust(w) for h, w in zip(shown, widths, strict=True))] + \
        ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
