"""Mixed precision for dataset runs: the dtype names of `--dtype`, and what a low
precision changes in the results (measured by `benchmarks/precision.py`, figures in
docs/scaling.md).

A run's model carries the dtype (`load_model(spec, dtype=parse_dtype("bf16"))`); every
run moves its images to the model's parameter dtype (`HookedViT.to_input`),
so nothing else changes. See https://pytorch.org/docs/stable/amp.html on which operations
lose precision in float16 / bfloat16.
"""

from __future__ import annotations

import torch
from hooked_vit.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
