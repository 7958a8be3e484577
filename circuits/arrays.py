"""Tensors to numpy for tables: numpy has no bfloat16, and half precision is no format to store
results in, so floating tensors below 32 bits become float32 (runs with `--dtype bf16 / fp16`)."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detached, on the CPU, float16 / bfloat16 as float32; other dtypes unchanged."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.element_size() < 4:
        tensor = tensor.float()
    return tensor.cpu().numpy()
