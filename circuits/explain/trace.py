"""One forward pass that keeps what explanation methods read: attention patterns (with
their autograd graph), chosen activations, the logits, and the model's readout row.

Every method in `circuits.explain` is a function of an `AttentionTrace`, so several
methods can share one forward pass (`explain_many`).

The "CLS row": methods read the relevance *of the model's output* from one row of a
token-to-token matrix. `readout_weights(cfg, n_tokens)` gives that row as weights over
query tokens:
- class-token models: one-hot on the class token;
- distilled models (class + distillation token, two heads averaged): 1/2 on each;
- models without a class token (GAP: average / max pooling): uniform over the pooled
  tokens (image tokens, prefix tokens too with `pool_include_prefix`). For average
  pooling this is exact: the pooled vector is that weighted sum of the token vectors;
  for max pooling it is an approximation.
- attention-pooling (MAP) heads (SigLIP, Perception Encoder): the pooling head's own
  weights over the tokens for each image (`attn_pool.hook_pattern`, averaged over the
  pooling heads), so the row is [b, p]: the pooled attention output is exactly that
  weighted sum of the tokens' values (per head), as a class token's output is of its row.
Register tokens get zero weight as queries; as keys they carry relevance like any
token, but maps are returned over image (patch) tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vit.errors import UserError

from hooked_vit import HookedViT, HookedViTConfig


def readout_weights(cfg: HookedViTConfig, n_tokens: int, device=None) -> Float[Tensor, "p"]:
    """Weights over query tokens that make up the model's readout (see the module doc)."""
    w = torch.zeros(n_tokens, device=device)
    if cfg.global_pool == "token":
        w[0] = 1.0
        if cfg.distilled:  # timm order: class, (registers), distillation token
            w[0] = w[cfg.n_prefix_tokens - 1] = 0.5
    else:
        first = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens
        w[first:] = 1.0 / (n_tokens - first)
    return w


@dataclass
class AttentionTrace:
    """What one forward pass leaves for the explanation methods.

    Tensors keep their autograd graph (gradients are taken lazily and cached).
    patterns[l]: [b, h, p, p] post-softmax attention of block l;
    acts[name]: any captured hook activation;
    readout: [p] query weights of the model's output ("CLS row", see module doc); [b, p]
        for a MAP head (each image's pooling weights).
    """

    model: HookedViT
    logits: Float[Tensor, "b c"]
    targets: Int[Tensor, "b"]
    patterns: list[Tensor]
    acts: dict[str, Tensor]
    readout: Float[Tensor, "p"] | Float[Tensor, "b p"]
    _target_grads: Optional[list[Tensor]] = field(default=None, repr=False)

    @property
    def n_prefix(self) -> int:
        return self.model.cfg.n_prefix_tokens

    @property
    def n_tokens(self) -> int:
        return self.patterns[0].shape[-1]

    def target_grads(self) -> list[Float[Tensor, "b h p p"]]:
        """d logit[target] / d pattern for every block (the total derivative, all paths).

        Summing the target logits over the batch gives every image its own gradient:
        images do not interact in a ViT forward pass.
        """
        if self._target_grads is None:
            y = self.logits.gather(1, self.targets[:, None]).sum()
            grads = torch.autograd.grad(y, self.patterns, retain_graph=True, allow_unused=True)
            self._target_grads = [torch.zeros_like(a) if g is None else g for a, g in zip(self.patterns, grads)]
        return self._target_grads

    def image_tokens(self, rel: Float[Tensor, "b p"]) -> Float[Tensor, "b n_patches"]:
        """Keep the image-token columns of a per-token relevance, as float32 without graph."""
        return rel[:, self.n_prefix:].detach().float()

    def read_row(self, m: Float[Tensor, "... p p"]) -> Float[Tensor, "... p"]:
        """The readout row of a token-to-token matrix [b, ..., p, p]: readout @ m."""
        if self.readout.ndim == 2:  # per image (MAP head)
            return torch.einsum("bq,b...qk->b...k", self.readout.to(m.dtype), m)
        return torch.einsum("q,...qk->...k", self.readout.to(m.dtype), m)

    def read_tokens(self, x: Float[Tensor, "b p d"]) -> Float[Tensor, "b d"]:
        """The readout of token vectors: sum_q readout[q] x[:, q]."""
        if self.readout.ndim == 2:
            return torch.einsum("bq,bqd->bd", self.readout.to(x.dtype), x)
        return torch.einsum("q,bqd->bd", self.readout.to(x.dtype), x)


def trace(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    targets: Optional[Tensor] = None,
    *,
    act_names: Sequence[str] = (),
    fwd_hooks: Sequence = (),
) -> AttentionTrace:
    """Run the model once, capturing every block's attention pattern and `act_names`.

    Args:
        targets: class ids [b] (or an int); None = the predicted class.
        act_names: extra hook points to keep (e.g. "blocks.0.hook_resid_pre").
        fwd_hooks: further (name, fn) hooks active during the pass (interventions).
    """
    if model.cfg.attention_type == "divided_space_time":
        raise UserError("explanation maps read every block's joint attention pattern [b, h, p, p]; divided space-time "
                         "attention has a temporal and a spatial pattern per block, grouped by (row, col) and by frame, "
                         "which these methods are not defined for: use a joint-attention video model")
    captured: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> Optional[Tensor]:
        if not act.requires_grad:  # a caller's hook put a constant here: make it a leaf
            act = act.detach().requires_grad_(True)  # that the gradients can be taken at
            captured[hook.name] = act
            return act
        captured[hook.name] = act
        return None  # the activation flows on unchanged

    pool = ["attn_pool.hook_pattern"] if model.attn_pool is not None else []
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)] + pool + list(act_names)
    # Gradients must exist even when the caller froze the weights: the images require
    # grad, so every activation does; autograd.grad never touches parameter .grad.
    # The caller's hooks run first, so an edited pattern is what the methods see.
    with torch.enable_grad(), model.hooks(fwd_hooks=list(fwd_hooks) + [(n, keep) for n in names]):
        x = images.detach().to(model.device).requires_grad_(True)
        logits = model(x)
    if targets is None:
        targets = logits.argmax(-1)
    targets = torch.as_tensor(targets, device=logits.device).long().expand(logits.shape[0])
    patterns = [captured.pop(f"blocks.{l}.attn.hook_pattern") for l in range(model.cfg.n_layers)]
    n_tokens = patterns[0].shape[-1]
    if pool:  # MAP head: each image's pooling weights over the pooled (last) tokens, heads averaged
        weights = captured.pop(pool[0]).detach()[:, :, 0].mean(1)  # [b, p_pooled]
        readout = weights.new_zeros(weights.shape[0], n_tokens)
        readout[:, n_tokens - weights.shape[1]:] = weights
    else:
        readout = readout_weights(model.cfg, n_tokens, logits.device)
    return AttentionTrace(model, logits, targets, patterns, captured, readout)
