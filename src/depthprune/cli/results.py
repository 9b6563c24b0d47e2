"""``depthprune results``: print the compared columns of a sweep's points in 160 characters, or all of them,
optionally as CSV."""

from __future__ import annotations

import argparse
import os


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("results", help="print the results table of a sweep directory",
                            description="Print the compared columns of a sweep's points in 160 characters (a "
                                        "footer names any left out); exit status 2 with one line when the directory "
                                        "has no finished point yet.")
    p.add_argument("directory")
    p.add_argument("--all", action="store_true", help="every column of the store, however wide")
    p.add_argument("--csv", metavar="FILE", help="also export every column as CSV ('-' for standard output)")
    return p


def run(args) -> None:
    from ..outputs import atomic_write_text, check_output_file
    from ..report.terminal import results_lines
    from ..sweep.store import DB_NAME, load_failed, load_points, to_csv

    if args.csv not in (None, "-"):  # before reading anything: a bad path fails alone
        check_output_file(args.csv, inputs=[os.path.join(args.directory, DB_NAME)], what="CSV file")
    points = load_points(args.directory)
    print("\n".join(results_lines(args.directory, points, load_failed(args.directory), every_column=args.all)))
    if args.csv == "-":
        print(to_csv(points), end="")
    elif args.csv:
        atomic_write_text(args.csv, to_csv(points))
        print(f"wrote {args.csv}")
