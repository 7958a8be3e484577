"""`hooked-vit report`: results directories -> one self-contained HTML report."""

from __future__ import annotations

from circuits.commands._common import positive_int

import argparse

ORDER = 90


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="render results directories into one HTML report",
                       description="Self-contained HTML report (plotly) from one or more results directories.")
    p.add_argument("results", nargs="+", help="results directories (a run, or a folder of runs)")
    p.add_argument("--out", default="report.html")
    p.add_argument("--title", default="hooked-vit report")
    p.add_argument("--images", type=positive_int, default=8,
                   help="images drawn per per-image figure (a sample; the rest enter the summaries only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from circuits.report import build_report

    print(f"report written to {build_report(args.results, args.out, args.title, images=args.images)}")
    return 0
