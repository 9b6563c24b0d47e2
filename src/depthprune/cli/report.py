"""``depthprune report``: draw the figures of a sweep and write one self-contained HTML file."""

from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("report", help="draw the figures of a sweep and write one self-contained HTML file")
    p.add_argument("directory")
    p.add_argument("--sigmas", type=float, default=2.0,
                   help="noise threshold of a collapse, in standard errors of the accuracy: a curve collapses where it "
                        "comes within this many SE of chance or drops this many combined SE below the full model "
                        "(default 2; the report states the rule)")
    return p


def run(args) -> None:
    from ..report.html import write_report

    print(f"wrote {write_report(args.directory, args.sigmas)}")
