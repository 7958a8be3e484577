"""Metrics over logits against class targets, (logits, clean_t, corrupted_t) -> [batch].

The patching metrics (logit difference, target logit, rank, identifiability) are the ones of
`circuits.patching`; cross-entropy is added for circuit discovery (Conmy et al. 2023,
"Towards Automated Circuit Discovery", use it alongside logit difference). Rank and
identifiability are piecewise constant: their gradient is zero, so they suit exact patching
and faithfulness, not AtP/EAP (refused there).
"""

from __future__ import annotations

from typing import Union

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.method_names import CIRCUIT_METRICS
from circuits.patching import METRICS as PATCHING_METRICS
from circuits.patching import Metric
from hooked_vit.errors import UserError


def cross_entropy(logits: Float[Tensor, "b c"], clean_t: Tensor, corrupted_t: Tensor) -> Tensor:
    """Negative cross-entropy of the clean target (higher = closer to the clean answer)."""
    return -F.cross_entropy(logits, clean_t, reduction="none")


METRICS: dict[str, Metric] = {**PATCHING_METRICS, "cross_entropy": cross_entropy}
NON_DIFFERENTIABLE = ("rank", "identifiability")
assert tuple(METRICS) == CIRCUIT_METRICS, "circuits.method_names must list the metrics of METRICS, in order"


def resolve_metric(metric: Union[str, Metric], needs_grad: bool = False) -> Metric:
    """A metric function from its name (or the function itself)."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose from {sorted(METRICS)} or pass fn(logits, clean_t, corrupted_t)")
    if needs_grad and metric in NON_DIFFERENTIABLE:
        raise UserError(f"metric {metric!r} has zero gradient; use logit_diff, target_logit or cross_entropy for AtP/EAP")
    return METRICS[metric]
