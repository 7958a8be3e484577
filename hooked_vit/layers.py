"""Block (layer) indices given by a user: the one rule for every function that takes a layer.

Python's rule for a sequence of `n_layers` blocks: 0..n-1 from the first block, -1..-n from
the last. Anything else is refused with a `UserError`, never wrapped (`12 % 6` would silently
name block 0 of a 6-block model).

    layer_index(-1, 6)            -> 5
    layer_indices([0, -1, 5], 6)  -> [0, 5]   (sorted, distinct)
    layer_index(6, 6)             -> UserError: layer 6 is outside [-6, 6) ...
"""

from __future__ import annotations

import operator
from typing import Iterable, Optional

from hooked_vit.errors import UserError


def layer_index(layer, n_layers: int, what: str = "layer") -> int:
    """The block index 0..n_layers-1 of `layer` in [-n_layers, n_layers); refused otherwise.

    what: how the caller's option is named in the message (e.g. "--layers", "start_layer").
    """
    return checked_index(layer, n_layers, what, unit="blocks")


def layer_indices(layers: Optional[Iterable], n_layers: int, what: str = "layers") -> list[int]:
    """Every block for None, else the distinct block indices of `layers`, sorted; an empty
    list is refused (it would select nothing)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        layers = [layers]
    chosen = sorted({layer_index(l, n_layers, what) for l in layers})
    if not chosen:
        raise UserError(f"{what}: no block given; name at least one of 0..{n_layers - 1} (or leave it out for all)")
    return chosen


def checked_index(index, n: int, what: str, unit: str = "items") -> int:
    """An index in [-n, n) as 0..n-1 (for layers, token positions, heads); refused otherwise."""
    try:
        i = operator.index(index)
    except TypeError:
        raise UserError(f"{what} {index!r} is not an integer index; give one of {-n}..{n - 1}") from None
    if isinstance(index, bool) or not -n <= i < n:
        raise UserError(f"{what} {index!r} is outside [{-n}, {n}): the model has {n} {unit} "
                        f"(0..{n - 1}, or -1..{-n} counting from the last)")
    return i % n


def block_range(start: Optional[int], stop: Optional[int], n_layers: int) -> range:
    """The blocks [start, stop) of `start_at_layer` / `stop_at_layer` (None: 0 / n_layers;
    negative counts from the end, as TransformerLens'); a bound outside [-n_layers, n_layers]
    is refused rather than clipped by slicing."""
    bounds = []
    for name, value, default in (("start_at_layer", start, 0), ("stop_at_layer", stop, n_layers)):
        if value is None:
            bounds.append(default)
            continue
        i = operator.index(value)
        if not -n_layers <= i <= n_layers:
            raise UserError(f"{name}={value!r} is outside [{-n_layers}, {n_layers}]: the model has {n_layers} blocks")
        bounds.append(i % n_layers if i < 0 else i)
    return range(bounds[0], bounds[1])
