"""Subcommands of `hooked-vit`, one module each.

A command module defines:
    ORDER: int                      position in `--help`
    add_parser(subparsers)          registers its subcommand(s); set_defaults(run=fn)

Commands only parse arguments and call the library (`circuits.runs`, `circuits.report`).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def command_modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
               if not info.name.startswith("_")]
    return sorted(modules, key=lambda m: getattr(m, "ORDER", 100))
