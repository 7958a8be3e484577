"""One entry point for every source: `load_pretrained("timm:NAME" | "hf:ID" |
"open_clip:ARCH[:TAG]" | "NAME")`, the strings TransformerLens users pass to
`from_pretrained` and the CLI's `--model` takes."""

from __future__ import annotations

from typing import Any

from hooked_vit.model import HookedViT

PREFIXES = ("timm", "hf", "open_clip")
TIMM_OWN_PREFIXES = ("hf-hub", "hf_hub", "local-dir")  # timm's own name schemes, passed through


def load_pretrained(spec: str, **kwargs: Any) -> HookedViT:
    """Dispatch a model string to its loader.

    "timm:NAME" and a bare NAME load timm weights (`pretrained=True` unless given);
    "hf:ID_OR_FOLDER" a transformers model; "open_clip:ARCH[:TAG]" an open_clip tower.
    Keyword arguments go to the loader (`from_timm`, `from_hf`, `from_open_clip`).
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"expected a model string such as 'timm:vit_base_patch16_224', got {spec!r}")
    source, sep, rest = spec.partition(":")
    if not sep or source not in PREFIXES:
        if sep and source not in TIMM_OWN_PREFIXES:
            raise ValueError(f"unknown model source {source!r} in {spec!r}; use one of {[p + ':' for p in PREFIXES]}")
        source, rest = "timm", spec  # a bare timm name
    if not rest:
        raise ValueError(f"{spec!r} names no model after {source + ':'!r}")
    if source == "timm":
        kwargs.setdefault("pretrained", True)
        return HookedViT.from_timm(rest, **kwargs)
    if source == "hf":
        return HookedViT.from_hf(rest, **kwargs)
    return HookedViT.from_open_clip(rest, **kwargs)
