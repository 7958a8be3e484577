"""`name:key=value,...` option strings, one syntax for method specs and `--arch` overrides."""

from __future__ import annotations

from typing import Any
from hooked_vit.errors import UserError


def parse_named_options(text: str, what: str = "options") -> tuple[str, dict[str, Any]]:
    """"vit_tiny_patch16_224:depth=2,img_size=32" -> ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}).

    Values become int, float or bool where they read as one, else stay strings.
    """
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"{what} are key=value pairs, got {item!r} in {text!r}")
        kwargs[key.strip()] = _literal(value.strip())
    return name, kwargs


def _literal(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)
