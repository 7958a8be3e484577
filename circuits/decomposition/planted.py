"""A planted background shortcut, to check spurious-feature removal against ground truth.

`plant_background_shortcut(model, reference)` returns forward hooks that turn one head into a
background detector on SyntheticShapes: a linear read-out of the mean patch embedding
(fitted on the reference split, so it works from the image content), written through the
head's own W_O towards the classes whose parity matches the background, the shortcut the
`spurious` embedded data offers (background = label % 2 in training). On a model that has
learned the shapes (the embedded default) this collapses worst-group accuracy; removal
should find the head and restore it. The head's attention is bypassed (its z is
overwritten), so its source-token terms do not apply.
"""

from __future__ import annotations

from typing import Optional

import torch

from circuits.data import collate_samples
from hooked_vit.layers import layer_index


@torch.no_grad()
def plant_background_shortcut(model, reference, strength: float = 10.0, layer: Optional[int] = None,
                              head: int = 0) -> tuple[list, str]:
    """(fwd_hooks, name of the planted head component) for `model` on SyntheticShapes data."""
    layer = layer_index(-1 if layer is None else layer, model.cfg.n_layers, "layer")
    n_prefix = model.cfg.n_prefix_tokens
    batch = collate_samples([reference[i] for i in range(len(reference))])
    _, cache = model.run_with_cache(batch["image"].to(model.device), names_filter="hook_embed")
    feats = _with_ones(cache["hook_embed"][:, n_prefix:].mean(1))
    target = batch["background"].to(feats) * 2 - 1
    ridge = feats.T @ feats + 1e-3 * torch.eye(feats.shape[1], device=feats.device)
    w = torch.linalg.solve(ridge, feats.T @ target)  # background detector, +1 / -1
    parity = torch.tensor([1.0 if c % 2 else -1.0 for c in range(model.cfg.n_classes)], device=feats.device)
    # The z direction whose output raises odd-class logits most (through the final norm's weight).
    norm_w = model.ln_final.weight if model.ln_final is not None and model.ln_final.weight is not None else 1.0
    e = (model.blocks[layer].attn.W_O[head] * norm_w) @ (model.W_U @ parity)
    e = strength * e / e.norm()
    state: dict = {}

    def detect(x, hook):
        state["background"] = torch.tanh(_with_ones(x[:, n_prefix:].mean(1)) @ w)

    def write(z, hook):
        z[:, :, head] = state["background"][:, None, None] * e
        return z

    return [("hook_embed", detect), (f"blocks.{layer}.attn.hook_z", write)], f"L{layer}H{head}"


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
