"""Projection of hidden states onto the class embedding space ("logit lens", Vilas et al. 2023).

For a hidden state h of any token at any site, logits = head(final_norm(h)), head bias
included (`HookedViT.to_class_logits`). The class rank is the number of classes with a
strictly larger logit than the target (0 = top-1); class identifiability is
1 - rank / n_classes (1 best; chance 0.5 + 1 / (2 n_classes), 0.5005 for ImageNet).

`project_batch` projects every token of every requested site inside the forward pass,
keeping only ranks, top-k ids and target logits, so memory is one [batch, tokens, classes]
tensor at a time, never images x sites x tokens x classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vit import HookedViT

# Site name -> per-block hook. "block" is the block output, "attn"/"mlp" the sublayer
# outputs (what each sublayer adds to the residual stream; already normed in post-norm blocks).
SITES = {"block": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}
DEFAULT_SITES = ("block", "attn", "mlp")


def check_sites(model: HookedViT, sites: Sequence[str]) -> list[str]:
    """The per-block hook names of `sites`, refusing (ValueError) any that cannot be projected
    onto the classes: unknown names, names given with a block prefix, and hooks whose
    activation is not a residual-width [batch, tokens, d_model] state (e.g. attn.hook_pattern).
    Checked on one blank image, so a long run cannot fail on its first batch."""
    names = [SITES.get(s, s) for s in sites]
    for site, name in zip(sites, names):
        if name.startswith("blocks."):
            raise ValueError(f"site {site!r}: give per-block hook names without 'blocks.N.' "
                             f"(e.g. {name.split('.', 2)[-1]!r}); every block is projected")
        model.check_hook_name(f"blocks.0.{name}")
    shapes: dict[str, tuple[int, ...]] = {}
    record = lambda act, hook: shapes.__setitem__(hook.name, tuple(act.shape))  # noqa: E731
    blank = torch.zeros(1, *model.cfg.input_shape, device=model.device, dtype=model.embed.proj.weight.dtype)
    with torch.no_grad():
        model.run_with_hooks(blank, fwd_hooks=[(f"blocks.0.{n}", record) for n in names])
    for site, name in zip(sites, names):
        shape = shapes.get(f"blocks.0.{name}")
        if shape is None or len(shape) != 3 or shape[-1] != model.cfg.d_model:
            raise ValueError(f"site {site!r} ({name}, activation shape {shape}) cannot be projected onto the "
                             f"classes: it needs a residual-width [batch, tokens, {model.cfg.d_model}] state "
                             f"such as {sorted(SITES)} or hook_resid_mid")
    return names


def class_rank(logits: Float[Tensor, "... c"], target: Int[Tensor, "..."]) -> Int[Tensor, "..."]:
    """0-based rank of `target` among classes sorted by logit, descending (int32).

    Counts strictly larger logits (same answer as an argsort without ties, far cheaper).
    `target` broadcasts against the leading dimensions of `logits`.
    """
    target = target.expand(logits.shape[:-1])
    return count_above(logits, logits.gather(-1, target[..., None])[..., 0])


def count_above(logits: Float[Tensor, "... c"], threshold: Float[Tensor, "..."]) -> Int[Tensor, "..."]:
    """Number of classes whose logit exceeds `threshold` (int32)."""
    # Summing the comparison as uint8 is ~4x faster on CPU than the bool -> int64 default.
    return (logits > threshold[..., None]).view(torch.uint8).sum(-1, dtype=torch.int32)


@dataclass
class BatchProjection:
    """Per-token projections of one batch. S = sites, L = layers, P = tokens, k = top-k."""

    sites: tuple[str, ...]
    rank: Int[Tensor, "b S L P"]
    target_logit: Float[Tensor, "b S L P"]
    topk: Int[Tensor, "b S L P k"]
    # Target logit of the stream before each block (resid_pre, L entries) and between the
    # sublayers (resid_mid): for the block and sublayer change rates.
    pre_target_logit: Float[Tensor, "b L P"]
    mid_target_logit: Float[Tensor, "b L P"]
    logits: Float[Tensor, "b c"]
    targets: Int[Tensor, "b"]

    @property
    def predictions(self) -> Int[Tensor, "b"]:
        return self.logits.argmax(-1)


@torch.inference_mode()
def project_batch(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    targets: Optional[Int[Tensor, "b"]] = None,
    sites: Sequence[str] = DEFAULT_SITES,
    k: int = 5,
    fwd_hooks: Sequence = (),
    **forward_kwargs,
) -> BatchProjection:
    """Run the model once and project every token of every site at every block.

    Args:
        targets: class per image; None uses the model's prediction (one extra forward).
        sites: names from `SITES`, or any per-block hook name such as "hook_resid_mid"
            or "ln2.hook_normalized" (projected as a residual vector).
        k: how many top classes to keep per token.
        fwd_hooks: extra hooks (e.g. attention perturbations) active during the run.
        forward_kwargs: passed to the model (e.g. keep_mask).
    """
    cfg = model.cfg
    model.require_classes()
    k = min(k, cfg.n_classes)
    hook_names = [SITES.get(s, s) for s in sites]
    for name in hook_names:
        model.check_hook_name(f"blocks.0.{name}")
    if targets is None:
        targets = model.run_with_hooks(images, fwd_hooks=list(fwd_hooks), **forward_kwargs).argmax(-1)
    targets = targets.to(model.device)
    unembed = (model.W_U, model.b_U)  # once per batch, not once per hook
    W_t, b_t = unembed[0][:, targets], unembed[1][targets]  # [d, b], [b]
    lens: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    pre: dict[int, Tensor] = {}
    mid: dict[int, Tensor] = {}

    def direction_logit(h: Tensor) -> Tensor:
        """Target logit of every token without the full class projection: [b, p]."""
        normed = model.ln_final.functional(h) if model.ln_final is not None else h
        return torch.einsum("bpd,db->bp", normed, W_t) + b_t[:, None]

    def lens_hook(act: Tensor, hook) -> None:
        # Reduced right here, so only one [b, p, classes] tensor is alive at a time.
        logits = model.to_class_logits(act, unembed)
        t = targets[:, None].expand(logits.shape[:-1])
        target_logit = logits.gather(-1, t[..., None])[..., 0]
        lens[hook.name] = (count_above(logits, target_logit), target_logit, logits.topk(k, dim=-1).indices)

    def stream_hook(table: dict[int, Tensor]):
        return lambda act, hook: table.__setitem__(hook.layer(), direction_logit(act))

    # The stream entering block l > 0 is block l-1's output: reuse its projection if present.
    reuse_block = "hook_resid_post" in hook_names
    hooks = list(fwd_hooks)
    for layer in range(cfg.n_layers):
        hooks += [(f"blocks.{layer}.{name}", lens_hook) for name in hook_names]
        if layer == 0 or not reuse_block:
            hooks.append((f"blocks.{layer}.hook_resid_pre", stream_hook(pre)))
        hooks.append((f"blocks.{layer}.hook_resid_mid", stream_hook(mid)))
    logits = model.run_with_hooks(images, fwd_hooks=hooks, **forward_kwargs)
    if reuse_block:
        pre.update({l: lens[f"blocks.{l - 1}.hook_resid_post"][1] for l in range(1, cfg.n_layers)})

    def stack(i: int) -> Tensor:  # -> [b, S, L, P, ...]
        per_site = [torch.stack([lens[f"blocks.{l}.{n}"][i] for l in range(cfg.n_layers)], 1) for n in hook_names]
        return torch.stack(per_site, 1)

    return BatchProjection(
        sites=tuple(sites),
        rank=stack(0),
        target_logit=stack(1),
        topk=stack(2),
        pre_target_logit=torch.stack([pre[l] for l in range(cfg.n_layers)], 1),
        mid_target_logit=torch.stack([mid[l] for l in range(cfg.n_layers)], 1),
        logits=logits,
        targets=targets,
    )
