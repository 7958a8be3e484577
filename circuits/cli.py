"""`hooked-vit`: the command line, a thin layer over the `circuits` functions.

Each subcommand lives in its own module under `circuits.commands`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from circuits.commands import command_modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-vit", description="Interpretability analyses for Vision Transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"hooked-vit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
