"""Subcommands of `hooked-vit`, one module each.

A command module defines:
    ORDER: int                      position in `--help` and in the demo
    add_parser(subparsers)          registers its subcommand(s); set_defaults(run=fn)
    ANALYSES: tuple[str, ...]       (optional) manifest "analysis" names it renders
    report_section(runs) -> [html]  (optional) HTML fragments for those runs
    demo(ctx: DemoContext)          (optional) its step of `hooked-vit demo`
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


def command_modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
               if not info.name.startswith("_")]
    return sorted(modules, key=lambda m: getattr(m, "ORDER", 100))


@dataclass
class DemoContext:
    """What every demo step gets: where to write, the embedded models and data."""

    out: Path
    trained: Any  # HookedViT, the embedded default
    random: Any  # HookedViT, the same architecture with random weights
    data: Any  # the synthetic test split, preprocessed
    batch_size: int = 64
    overwrite: bool = False
    device: str = "cpu"
    extras: dict = field(default_factory=dict)
