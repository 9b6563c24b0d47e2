"""The sweep's results store: one SQLite row per finished point, written in a transaction.

A point is (block size n, strategy, healing). Its row holds the settings it ran with and every figure
it produced, as JSON, so a rerun of the same sweep can skip it and a report can be drawn from the table.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

from .errors import DepthpruneError

DB_NAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    key TEXT PRIMARY KEY,      -- 'n=8/similarity/qlora'
    n INTEGER NOT NULL,        -- layers removed
    fraction REAL NOT NULL,    -- n / layers of the full model
    strategy TEXT NOT NULL,    -- 'full', 'similarity' or 'deepest'
    heal TEXT NOT NULL,        -- 'none', 'qlora', 'lora' or 'full'
    removed_layers TEXT NOT NULL,  -- JSON list, 0-based
    distance REAL,             -- angular distance of the removed block
    metrics TEXT NOT NULL,     -- JSON: flat name -> number
    details TEXT NOT NULL,     -- JSON: full evaluation, cost and healing records
    finished TEXT NOT NULL
)
"""


COLUMNS = ("key", "n", "fraction", "strategy", "heal", "removed_layers", "distance", "metrics", "details", "finished")


def point_key(n: int, strategy: str, heal: str) -> str:
    return f"n={n}/{strategy}/{heal}"


def _damaged(path: Path, why: str) -> DepthpruneError:
    return DepthpruneError(f"'{path}' is not a readable depthprune results table ({why}): rerun the sweep with "
                           "--force to start it over, or delete the file")


def _open_existing(path: Path) -> sqlite3.Connection:
    """Open ``path`` (which must exist) read-write without creating anything, and check it is a results table."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(points)"))
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _damaged(path, str(exc)) from None
    if check != "ok":
        db.close()
        raise _damaged(path, check)
    if columns and columns != COLUMNS:
        db.close()
        raise _damaged(path, f"its points table has the columns {', '.join(columns)}")
    return db


def read_finished(directory: str | Path) -> set[str]:
    """The keys of the finished points in ``directory`` (none without a results file); checks the file, writes nothing."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        return set()
    db = _open_existing(path)
    try:
        return {row[0] for row in db.execute("SELECT key FROM points")} if _has_table(db) else set()
    finally:
        db.close()


def _has_table(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'points'").fetchone() is not None


def connect(directory: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) the results of ``directory``; an existing file must be a results table."""
    path = Path(directory) / DB_NAME
    db = _open_existing(path) if path.is_file() else sqlite3.connect(path)
    db.execute(_SCHEMA)
    db.commit()
    return db


def finished_keys(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT key FROM points")}


def save_point(db: sqlite3.Connection, *, n: int, fraction: float, strategy: str, heal: str, removed_layers,
               distance: float | None, metrics: dict, details: dict) -> None:
    """Insert one finished point atomically (a crash leaves either the whole row or none)."""
    with db:
        db.execute(
            "INSERT OR REPLACE INTO points VALUES (?,?,?,?,?,?,?,?,?,?)",
            (point_key(n, strategy, heal), n, fraction, strategy, heal, json.dumps(list(removed_layers)), distance,
             json.dumps(metrics), json.dumps(details), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )


def load_points(directory: str | Path) -> list[dict]:
    """All finished points of a sweep directory, sorted by n, strategy, healing."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        raise DepthpruneError(f"no {DB_NAME} in '{directory}': is it the --out of a `depthprune sweep`?")
    db = _open_existing(path)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM points ORDER BY n, strategy, heal").fetchall() if _has_table(db) else []
    finally:
        db.close()
    try:
        return [
            {**dict(row), "removed_layers": json.loads(row["removed_layers"]), "metrics": json.loads(row["metrics"]),
             "details": json.loads(row["details"])}
            for row in rows
        ]
    except (TypeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"a row does not hold JSON: {exc}") from None


FIXED_COLUMNS = ["n", "fraction", "strategy", "heal", "removed_layers", "distance"]


def table(points: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: the fixed columns, then every metric any point has, in first-seen order."""
    metric_names: list[str] = []
    for p in points:
        metric_names += [k for k in p["metrics"] if k not in metric_names]
    rows = [[p[c] if c != "removed_layers" else ",".join(map(str, p[c])) for c in FIXED_COLUMNS]
            + [p["metrics"].get(k) for k in metric_names] for p in points]
    return FIXED_COLUMNS + metric_names, rows


def to_csv(points: list[dict]) -> str:
    header, rows = table(points)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
