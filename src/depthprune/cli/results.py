"""``depthprune results``: print the results table of a sweep directory, optionally as CSV."""

from __future__ import annotations

import argparse
import os


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("results", help="print the results table of a sweep directory")
    p.add_argument("directory")
    p.add_argument("--csv", metavar="FILE", help="also export the table as CSV ('-' for standard output)")
    return p


def run(args) -> None:
    from ..outputs import atomic_write_text, check_output_file
    from ..sweep.store import DB_NAME, load_failed, load_points, table, to_csv

    if args.csv not in (None, "-"):  # before reading anything: a bad path fails alone
        check_output_file(args.csv, inputs=[os.path.join(args.directory, DB_NAME)], what="CSV file")
    points = load_points(args.directory)
    header, rows = table(points)
    shown = [h for h in header if not h.endswith("_chance")]
    cells = [[_cell(v) for h, v in zip(header, row, strict=True) if h in shown] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(shown)]
    print("  ".join(h.rjust(w) for h, w in zip(shown, widths, strict=True)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    for key, failure in load_failed(args.directory).items():  # points a Ray sweep could not finish
        print(f"failed: {key} ({failure['attempts']}x, last {failure['failed']}): {failure['error']}")
    if args.csv == "-":
        print(to_csv(points), end="")
    elif args.csv:
        atomic_write_text(args.csv, to_csv(points))
        print(f"wrote {args.csv}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
