"""The sweep's results store: one SQLite row per finished point, written in a transaction.

A point is (block size n, selection criterion, repair, healing). Its row holds the settings it ran with and every figure
it produced, as JSON, so a rerun of the same sweep can skip it and a report can be drawn from the table.

The ``failed`` table holds the points whose run raised or whose worker died (a Ray sweep records them and
goes on with the others): the key, the error in one line and how often it failed. A point leaves it in the
transaction that saves its row. Added in issue 12: an older table gains it when a sweep next opens it to
write (``CREATE TABLE IF NOT EXISTS``), and older versions ignore it.

The ``cost`` table holds one row per distinct cut size (layer count, or sub-layer count of a kind): the cost timed in the sweep's final phase (median
and spread over interleaved rounds). It is rewritten whole, in the same transaction that copies each
record into the points of that layer count, every time a sweep finishes.

Older tables are read as they are and brought up to date, in one transaction, when a sweep opens them to
write: before issue 9 the criterion column was called 'strategy'; before issue 18 the n = 0 point's criterion
was 'full' (key 'n=0/full/none'), the name of a healing method too, and is now 'unpruned'; before issue 19
the points had no 'repair' column (every point was cut without one): it is added, 'none' for the rows there.
A point cut without a repair keeps the key it always had ('n=2/similarity/lora'); a repaired one names its
repair after the criterion ('n=2/similarity+linear/lora'). The ``failed`` table has no repair column: its
keys name the repair. Before issue 20 every point cut whole layers and there was no 'granularity' column: it is
added, 'layer' for the rows there. A layer point keeps its key; a sub-layer point names its granularity after n
('n=8@attention/similarity/none': 8 attention sub-layers removed), in ``failed`` too.

The ``cost`` table holds one row per distinct cut size (n, granularity); a table of before issue 20 (one row per
n) is replaced whole by the next cost phase, like any other.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

from ..errors import DepthpruneError

DB_NAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    key TEXT PRIMARY KEY,      -- 'n=8/similarity/qlora'
    n INTEGER NOT NULL,        -- layers removed
    fraction REAL NOT NULL,    -- n / layers of the full model
    criterion TEXT NOT NULL,   -- 'unpruned' (n = 0), or a selection criterion: 'similarity', 'deepest', ...
    heal TEXT NOT NULL,        -- 'none', 'qlora', 'lora' or 'full'
    removed_layers TEXT NOT NULL,  -- JSON list, 0-based
    distance REAL,             -- angular distance of the removed block
    metrics TEXT NOT NULL,     -- JSON: flat name -> number
    details TEXT NOT NULL,     -- JSON: full evaluation, cost and healing records
    finished TEXT NOT NULL,
    repair TEXT NOT NULL DEFAULT 'none',  -- 'none', or the repair of the cut: 'linear', 'linear-cosine', ...
    granularity TEXT NOT NULL DEFAULT 'layer'  -- what n counts: 'layer', or 'attention' / 'mlp' sub-layers
)
"""

# Last, so that a table from before issue 19 / 20 gains them by ALTER TABLE ... ADD COLUMN and has today's columns.
COLUMNS = ("key", "n", "fraction", "criterion", "heal", "removed_layers", "distance", "metrics", "details", "finished",
           "repair", "granularity")
LAYER_ONLY_COLUMNS = COLUMNS[:-1]  # before issue 20
UNREPAIRED_COLUMNS = COLUMNS[:-2]  # before issue 19
LEGACY_COLUMNS = tuple("strategy" if c == "criterion" else c for c in UNREPAIRED_COLUMNS)  # before issue 9
NO_REPAIR = "none"
LAYER = "layer"  # the granularity of a whole-layer cut (every point before issue 20)
UNPRUNED = "unpruned"  # the criterion of the n = 0 point: nothing removed
LEGACY_UNPRUNED = "full"  # its name before issue 18
_COST_SCHEMA = """
CREATE TABLE IF NOT EXISTS cost (
    n INTEGER NOT NULL,        -- layers (or sub-layers of the granularity) removed
    granularity TEXT NOT NULL DEFAULT 'layer',
    num_layers INTEGER NOT NULL,  -- layers kept
    record TEXT NOT NULL,      -- JSON: medians, spread [min, max] and values of the rounds, settings, phase
    measured TEXT NOT NULL,
    PRIMARY KEY (n, granularity)
)
"""

_FAILED_SCHEMA = """
CREATE TABLE IF NOT EXISTS failed (
    key TEXT PRIMARY KEY,      -- 'n=8/similarity/qlora'
    n INTEGER NOT NULL,
    criterion TEXT NOT NULL,
    heal TEXT NOT NULL,
    error TEXT NOT NULL,       -- one line: 'RuntimeError: CUDA out of memory ...', 'worker died: ...'
    attempts INTEGER NOT NULL, -- runs in which it failed
    failed TEXT NOT NULL
)
"""


def point_key(n: int, criterion: str, heal: str, repair: str = NO_REPAIR, granularity: str = LAYER) -> str:
    """'n=2/similarity/lora', with a repair 'n=2/similarity+linear/lora' (unrepaired keys as before issue 19), at a
    sub-layer granularity 'n=8@attention/similarity/none' (layer keys as before issue 20)."""
    cut = criterion if repair == NO_REPAIR else f"{criterion}+{repair}"
    size = n if granularity == LAYER else f"{n}@{granularity}"
    return f"n={size}/{cut}/{heal}"


def current_key(key: str) -> str:
    """A point's key as written today: 'n=0/full/none' of a table from before issue 18 is 'n=0/unpruned/none'."""
    legacy = point_key(0, LEGACY_UNPRUNED, "")
    return point_key(0, UNPRUNED, key[len(legacy):]) if key.startswith(legacy) else key


def _current_row(row: dict) -> dict:
    """A point's row as written today (see :func:`current_key`)."""
    if row["n"] == 0 and row["criterion"] == LEGACY_UNPRUNED:
        return {**row, "key": current_key(row["key"]), "criterion": UNPRUNED}
    return row


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
    if columns and columns not in (COLUMNS, LAYER_ONLY_COLUMNS, UNREPAIRED_COLUMNS, LEGACY_COLUMNS):
        db.close()
        raise _damaged(path, f"its points table has the columns {', '.join(columns)}")
    return db


def _columns(db: sqlite3.Connection) -> tuple[str, ...]:
    return tuple(row[1] for row in db.execute("PRAGMA table_info(points)"))


def _is_legacy(db: sqlite3.Connection) -> bool:
    return _columns(db) == LEGACY_COLUMNS


def _holds_legacy_unpruned(db: sqlite3.Connection) -> bool:
    """Whether a row or a failure still calls the n = 0 point 'full' (asked once the column is 'criterion')."""
    return any(db.execute(f"SELECT 1 FROM {t} WHERE n = 0 AND criterion = ?", (LEGACY_UNPRUNED,)).fetchone()
               for t in ("points", "failed") if _has_table(db, t))


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older table up to date in one transaction (it is either old or new): rename the 'strategy'
    column 'criterion', the n = 0 point's criterion 'full' 'unpruned' (in its key too, and in ``failed``), and
    add the 'repair' column ('none': rows from before issue 19 were cut without a repair) and the 'granularity'
    column ('layer': rows from before issue 20 cut whole layers)."""
    if not _has_table(db) or not (_is_legacy(db) or _holds_legacy_unpruned(db) or "granularity" not in _columns(db)):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if _is_legacy(db):
            db.execute("ALTER TABLE points RENAME COLUMN strategy TO criterion")
        if "repair" not in _columns(db):
            db.execute(f"ALTER TABLE points ADD COLUMN repair TEXT NOT NULL DEFAULT '{NO_REPAIR}'")
        if "granularity" not in _columns(db):
            db.execute(f"ALTER TABLE points ADD COLUMN granularity TEXT NOT NULL DEFAULT '{LAYER}'")
        legacy, prefix = point_key(0, LEGACY_UNPRUNED, ""), point_key(0, UNPRUNED, "")
        for t in [t for t in ("points", "failed") if _has_table(db, t)]:
            # OR IGNORE, then DELETE: where an older version wrote 'full' again beside 'unpruned', today's row stays
            db.execute(f"UPDATE OR IGNORE {t} SET criterion = ?, key = ? || substr(key, ?) "
                       "WHERE n = 0 AND criterion = ?", (UNPRUNED, prefix, len(legacy) + 1, LEGACY_UNPRUNED))
            db.execute(f"DELETE FROM {t} WHERE n = 0 AND criterion = ?", (LEGACY_UNPRUNED,))
    except BaseException:
        db.rollback()
        raise
    db.commit()


def read_finished(directory: str | Path) -> set[str]:
    """The keys of the finished points in ``directory`` (none without a results file); checks the file, writes nothing."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        return set()
    db = _open_existing(path)
    try:
        return finished_keys(db) if _has_table(db) else set()
    finally:
        db.close()


def _has_table(db: sqlite3.Connection, name: str = "points") -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def connect(directory: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) the results of ``directory``; an existing file must be a results table."""
    path = Path(directory) / DB_NAME
    db = _open_existing(path) if path.is_file() else sqlite3.connect(path)
    _migrate(db)
    db.execute(_SCHEMA)
    db.execute(_COST_SCHEMA)
    db.execute(_FAILED_SCHEMA)
    db.commit()
    return db


def finished_keys(db: sqlite3.Connection) -> set[str]:
    return {current_key(row[0]) for row in db.execute("SELECT key FROM points")}


def save_point(db: sqlite3.Connection, *, n: int, fraction: float, criterion: str, heal: str, removed_layers,
               distance: float | None, metrics: dict, details: dict, repair: str = NO_REPAIR,
               granularity: str = LAYER) -> None:
    """Insert one finished point atomically (a crash leaves either the whole row or none); a failure recorded
    for it before is dropped in the same transaction."""
    key = point_key(n, criterion, heal, repair, granularity)
    with db:
        db.execute("DELETE FROM failed WHERE key = ?", (key,))
        db.execute(
            f"INSERT OR REPLACE INTO points ({', '.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
            (key, n, fraction, criterion, heal, json.dumps(list(removed_layers)), distance, json.dumps(metrics),
             json.dumps(details), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), repair, granularity),
        )


def save_failure(db: sqlite3.Connection, *, n: int, criterion: str, heal: str, error: str,
                 repair: str = NO_REPAIR, granularity: str = LAYER) -> None:
    """Record that a point failed (one transaction), counting the attempts; its finished row, if any, stays."""
    key = point_key(n, criterion, heal, repair, granularity)
    line = " ".join(str(error).split()) or "failed"
    with db:
        row = db.execute("SELECT attempts FROM failed WHERE key = ?", (key,)).fetchone()
        db.execute("INSERT OR REPLACE INTO failed VALUES (?,?,?,?,?,?,?)",
                   (key, n, criterion, heal, line[:2000], (row[0] if row else 0) + 1,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))


def read_failed(db: sqlite3.Connection) -> dict[str, dict]:
    """Key -> {n, criterion, heal, error, attempts, failed} of every point recorded as failed ({} in an old table)."""
    if not _has_table(db, "failed"):
        return {}
    names = ("key", "n", "criterion", "heal", "error", "attempts", "failed")
    rows = [_current_row(dict(zip(names, row, strict=True)))
            for row in db.execute(f"SELECT {', '.join(names)} FROM failed ORDER BY n, criterion, heal")]
    return {row.pop("key"): row for row in rows}


def load_failed(directory: str | Path) -> dict[str, dict]:
    """The failed points of a sweep directory (read only; {} without a results file)."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        return {}
    db = _open_existing(path)
    try:
        return read_failed(db)
    finally:
        db.close()


def point_seconds(db: sqlite3.Connection) -> dict[str, float]:
    """Key -> the seconds each finished point took (as its ``details`` record them; points without: left out)."""
    seconds = {}
    for key, details in db.execute("SELECT key, details FROM points"):
        try:
            value = json.loads(details).get("seconds")
        except (TypeError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds[current_key(key)] = float(value)
    return seconds


def _points_of(db: sqlite3.Connection, path: Path) -> list[dict]:
    db.row_factory = sqlite3.Row
    try:
        present = _columns(db) if _has_table(db) else ()
        # An older table, only read: its columns under today's names
        spelled = {"criterion": "strategy AS criterion" if "strategy" in present else "criterion",
                   "repair": "repair" if "repair" in present else f"'{NO_REPAIR}' AS repair",
                   "granularity": "granularity" if "granularity" in present else f"'{LAYER}' AS granularity"}
        query = f"SELECT {', '.join(spelled.get(c, c) for c in COLUMNS)} FROM points"
        rows = db.execute(query + " ORDER BY granularity != 'layer', granularity, n, criterion, repair, heal"
                          ).fetchall() if present else []
    finally:
        db.row_factory = None
    try:
        return [
            _current_row({**dict(row), "removed_layers": json.loads(row["removed_layers"]),
                          "metrics": json.loads(row["metrics"]), "details": json.loads(row["details"])})
            for row in rows
        ]
    except (TypeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"a row does not hold JSON: {exc}") from None


def read_points(db: sqlite3.Connection) -> list[dict]:
    """All finished points of an open results table, as :func:`load_points` gives them."""
    return _points_of(db, Path(db.execute("PRAGMA database_list").fetchone()[2] or DB_NAME))


def load_points(directory: str | Path) -> list[dict]:
    """All finished points of a sweep directory, layer cuts first then each sub-layer granularity, each sorted by
    n, criterion, repair, healing (an old table is only read)."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        raise DepthpruneError(f"no {DB_NAME} in '{directory}': is it the --out of a `depthprune sweep`?")
    db = _open_existing(path)
    try:
        return _points_of(db, path)
    finally:
        db.close()


CutSize = tuple[int, str]  # (n, granularity): what one cost record times


def save_cost(db: sqlite3.Connection, costs: dict[CutSize, dict], points: dict[str, tuple[dict, dict]]) -> None:
    """Replace the cost table by ``costs`` ((n, granularity) -> record) and set the ``metrics`` and ``details`` of
    the points in ``points`` (key -> (metrics, details)), all in one transaction: a kill leaves the old or the new.
    The table is created anew, so one of before issue 20 (keyed by n alone) gets today's columns."""
    measured = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with db:
        db.execute("DROP TABLE IF EXISTS cost")
        db.execute(_COST_SCHEMA)
        db.executemany("INSERT INTO cost (n, granularity, num_layers, record, measured) VALUES (?,?,?,?,?)",
                       [(n, granularity, record["num_layers"], json.dumps(record), measured)
                        for (n, granularity), record in sorted(costs.items())])
        db.executemany("UPDATE points SET metrics = ?, details = ? WHERE key = ?",
                       [(json.dumps(metrics), json.dumps(details), key) for key, (metrics, details) in points.items()])


def read_cost(db: sqlite3.Connection) -> dict[CutSize, dict]:
    """(n, granularity) -> the cost record of the sweep's last cost phase, from an open results table ({} when
    none finished; a table of before issue 20 timed whole layers only)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cost'").fetchone() is None:
        return {}
    columns = {row[1] for row in db.execute("PRAGMA table_info(cost)")}
    granularity = "granularity" if "granularity" in columns else f"'{LAYER}'"
    try:
        return {(n, kind): {**json.loads(record), "measured": measured} for n, kind, record, measured in
                db.execute(f"SELECT n, {granularity}, record, measured FROM cost ORDER BY {granularity}, n")}
    except (TypeError, json.JSONDecodeError) as exc:
        raise DepthpruneError(f"the cost table of a results file does not hold JSON ({exc}): rerun the sweep "
                              "to time the cost again") from None


def load_cost(directory: str | Path) -> dict[CutSize, dict]:
    """(n, granularity) -> the cost record of the sweep's last cost phase in ``directory`` ({} when none has finished)."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        return {}
    db = _open_existing(path)
    try:
        return read_cost(db)
    finally:
        db.close()


FIXED_COLUMNS = ["n", "fraction", "criterion", "heal", "removed_layers", "distance"]


def is_sublayer(points: list[dict]) -> bool:
    """Whether any point cut sub-layers (points of older stores have no 'granularity': whole layers)."""
    return any(p.get("granularity", LAYER) != LAYER for p in points)


def is_repaired(points: list[dict]) -> bool:
    """Whether any point was repaired (points of older stores or made by hand may have no 'repair')."""
    return any(p.get("repair", NO_REPAIR) != NO_REPAIR for p in points)


def fixed_columns(points: list[dict]) -> list[str]:
    """The fixed columns of a table of ``points``: 'granularity' after n only where a point cut sub-layers,
    'repair' after the criterion only where a point was repaired, so the tables of other sweeps stay as they were."""
    columns = list(FIXED_COLUMNS)
    if is_repaired(points):
        columns.insert(columns.index("criterion") + 1, "repair")
    if is_sublayer(points):
        columns.insert(columns.index("n") + 1, "granularity")
    return columns


_DEFAULTS = {"repair": NO_REPAIR, "granularity": LAYER}  # of the columns a point of an older store may lack


def table(points: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: the fixed columns, then every metric any point has, in first-seen order."""
    metric_names: list[str] = []
    for p in points:
        metric_names += [k for k in p["metrics"] if k not in metric_names]
    fixed = fixed_columns(points)
    rows = [[",".join(map(str, p[c])) if c == "removed_layers" else p.get(c, _DEFAULTS[c]) if c in _DEFAULTS else p[c]
             for c in fixed] + [p["metrics"].get(k) for k in metric_names] for p in points]
    return fixed + metric_names, rows


def to_csv(points: list[dict]) -> str:
    header, rows = table(points)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
