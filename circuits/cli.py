"""`hooked-vit`: the command line, a thin layer over the `circuits` functions.

Each subcommand lives in its own module under `circuits.commands`; they import torch and the
library only when they run, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from circuits.commands import command_modules

# What a user can get wrong (a path, a spec, a device, a checkpoint): one line, exit 2. The
# library raises these with messages that say what was wrong and what to do.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError,
               PermissionError)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("hooked-vit")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "0.1.0+source"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-vit", description="Interpretability analyses for Vision Transformers.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.add_parser(sub)
    for command in sub.choices.values():  # every command's --help shows its defaults
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hooked-vit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nhooked-vit {args.command}: interrupted; finished batches are saved, run the same command "
              "again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
