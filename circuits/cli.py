"""`hooked-vit`: the command line, a thin layer over the `circuits` functions.

Each subcommand lives in its own module under `circuits.commands`; they import torch and the
library only when they run, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

from circuits.commands import command_modules

# Operating-system errors about a path the user gave (a missing file, a folder where a file
# was expected, no permission): one line naming the path, exit 2. Everything the library raises
# on purpose for a user derives from hooked_vit.errors.UserError; anything else is a bug.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


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
    except KeyboardInterrupt:
        print(f"\nhooked-vit {args.command}: interrupted; finished batches are saved, run the same command "
              "again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns exceptions into exit codes
        return report_error(args, err)


def report_error(args: argparse.Namespace, err: Exception) -> int:
    """A user error (UserError, or an OS error about a path): one line, exit 2 (with -v its
    traceback first). Anything else is a bug in hooked-vit: its traceback, a line asking to
    report it, exit 1."""
    from hooked_vit.errors import UserError

    if isinstance(err, (UserError, *PATH_ERRORS)):
        if args.verbose:
            traceback.print_exception(err, file=sys.stderr)
        print(f"hooked-vit {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    traceback.print_exception(err, file=sys.stderr)
    print(f"hooked-vit {args.command}: internal error ({type(err).__name__}): this is a bug in hooked-vit, not "
          f"in what you typed; please report it to the hooked-vit maintainers with the command, `hooked-vit "
          "--version` and the traceback above",
          file=sys.stderr)
    return 1


def user_message(err: Exception) -> str:
    """The one line of a user error; an OS error names its path (Python's own message may not)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return str(err)

if __name__ == "__main__":
    sys.exit(main())
