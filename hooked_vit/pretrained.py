"""`load_pretrained(spec)`: `HookedViT.from_pretrained` as a function (the spec grammar and its
resolution are `hooked_vit.specs`)."""

from __future__ import annotations

from typing import Any

from hooked_vit.model import HookedViT
from hooked_vit.specs import PREFIXES, TIMM_OWN_PREFIXES  # noqa: F401  (re-exported)


def load_pretrained(spec: str, **kwargs: Any) -> HookedViT:
    """`HookedViT.from_pretrained(spec, **kwargs)`; see `hooked_vit.specs` for the grammar."""
    return HookedViT.from_pretrained(spec, **kwargs)
