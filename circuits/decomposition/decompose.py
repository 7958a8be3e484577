"""Exact decomposition of a ViT's final representation into component contributions.

After Balasubramanian, Basu and Feizi (NeurIPS 2024). The residual stream at the last block
is a sum: the stream entering the start layer ("embed" at layer 0, else "resid_in"), every
attention head's output, every MLP's output and the bias terms. The final representation
(what `hook_pooled` holds) is

    rep[r] = LN_f( sum_q pool[r, q] * resid[q] )          (pooled final norm, GAP)
    rep[r] = sum_q pool[r, q] * LN_f(resid[q])             (per-token final norm)

with r the read-out vector (the class token; the class and distillation tokens of a
distilled model; the token average of a GAP model). Both are linear in the stream once the
LayerNorm is linearised with the real statistics of the full residual vector:

    LN(x) = w * (x - mean(x)) / sqrt(var(x) + eps) + b          (biased var, the model's eps)
    c  ->  w * (c - mean(c)) / sqrt(var(x) + eps)                (each component c)

and the bias b becomes a component of its own, so the components sum to the representation
to float precision. `Readout` holds that linear map: query weights
u[b, r, q] = pool[r, q] / sigma[b, r or q] and the centring-and-weight map F.

Post-norm blocks (`ResPostBlock`, x + ln1(attn(x))) normalise each sublayer's output; those
norms are linearised in the same way with their own per-token statistics (read from
`ln1/ln2.hook_scale`), so head and MLP terms stay exact there too and the sublayer norm
biases are components.

Divided space-time attention (TimeSformer; docs/video.md): each block's temporal attention
is one more set of per-head components ("time_head", named L{l}H{h}.time, and its bias
"attn_time.b_O", which writes to the patch tokens only); the spatial attention's grouped
z [b, T, prefix + rows*cols, h, e] is laid back onto the token sequence (a prefix token's
output is the mean over the frames, as the block computes it). `per_time_terms` splits every
component by the time position of the token the representation reads it from.

RMSNorm models (AIMv2): the same linearisation without centring and without a bias,
c -> w * c / rms(x), rms(x) = sqrt(mean(x^2) + eps) read from `hook_scale`.

Attention-pooling (MAP) heads (SigLIP, Perception Encoder): the pooled vector is
attn_out + mlp(ln(attn_out)) with attn_out = sum_h sum_k A[h, k] LN_f(resid_k) W_V[h] W_O[h]
+ b_V W_O + b_O. With the pooling weights A (softmax over the tokens, `attn_pool.hook_pattern`)
frozen at their real values, attn_out is linear in the stream like a class-token read-out
(one read-out row per pooling head, then that head's OV map): every stream component's share
flows through the pooling weights. The head's own MLP, a nonlinear function of the whole
pooled vector, is one further component `attn_pool.mlp`, its real output on the actual
pooled input (as an MLP's output is one term of the stream). The constants are
`ln_final.b` (the final norm's bias through the values) and `attn_pool.b` (b_V W_O + b_O).
This extends the paper's treatment of the final LayerNorm (frozen at the image's own
statistics; Balasubramanian et al. 2024) to the pooling softmax, frozen at the image's own
pooling weights, as the direct-path decompositions of class-token ViTs freeze every
attention pattern (Gandelsman et al. 2024). We found no published decomposition of a MAP
head; this is our choice, documented in docs/decomposition.md.

Differential attention (cfg.diff_attn; Ye et al. 2024, arXiv:2410.05258): W_O reads each
head's z through its own RMS sub-norm, sub_norm(z_h) * (1 - lambda_init), so a head's term is
that normalised output (`attn.sub_norm.hook_normalized`) through W_O[h]: heads stay separate
terms and the sum stays exact. Split by source token (`token_terms`), the sub-norm's scale is
held at each query's real value, as the final norm's is.

Heads can be split further by source token: head h of layer l contributes
sum_q u[r, q] A[h, q, k] v_k W_O[h] through source token k (`token_terms`). Those are
produced layer by layer and head chunk by head chunk, so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Optional, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vit.errors import UnsupportedModelError
from hooked_vit import HookedViT
from hooked_vit.errors import UserError

BiasMode = Literal["separate", "split", "reference"]
BIAS_MODES = ("separate", "split", "reference")
BIAS_KINDS = ("b_O", "ln1.b", "b_out", "ln2.b", "ln_final.b", "attn_pool.b", "b_U", "attn_time.b_O")


@dataclass(frozen=True)
class Component:
    """One term of the decomposition.

    kind: "embed" (stream at layer 0: patch + prefix + position embedding, after CLIP's
    ln_pre), "resid_in" (stream entering a later start layer), "head", "mlp", or a bias:
    "b_O", "b_out", "ln1.b" / "ln2.b" (post-norm sublayer norm biases), "ln_final.b",
    "attn_pool.b" (MAP head: b_V W_O + b_O), "b_U" (head bias, logits only); for a MAP
    head "attn_pool.mlp" (the head's MLP on the actual pooled vector); divided space-time
    models also "time_head" (a temporal attention head) and "attn_time.b_O".
    """

    kind: str
    layer: Optional[int] = None
    head: Optional[int] = None

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind == "time_head":
            return f"L{self.layer}H{self.head}.time"
        if self.layer is None:
            return self.kind
        return f"L{self.layer}.{self.kind}"

    @property
    def is_bias(self) -> bool:
        return self.kind in BIAS_KINDS

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- readout
@dataclass
class Readout:
    """The linear map from the residual stream to the representation, for one batch.

    weights: u [b, R, p], query weights with the final norm's 1/sigma folded in; R = r, or
        for a MAP head one row per pooling head (its pooling weights).
    final_weight / final_center: F(x) = final_weight * (x - mean(x)) (centring only when the
        model has a final LayerNorm, not for RMSNorm; no weight after `fold_ln`).
    final_bias: the final norm's bias [d] (a component), or None.
    sub_scales: post-norm blocks only: (layer, 1 | 2) -> sigma [b, p] of ln1 / ln2.
    pool_W_V / pool_W_O: MAP head only: the pooling heads' value [h, d, e] and output
        [h, e, d] maps; `read` sends the R = h rows through them and sums to one row.
    """

    weights: Float[Tensor, "b R p"]
    final_center: bool
    final_weight: Optional[Tensor]
    final_bias: Optional[Tensor]
    sub_scales: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    pool_W_V: Optional[Tensor] = None
    pool_W_O: Optional[Tensor] = None

    def final(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """F: the linearised final norm without its bias (identity without a final norm)."""
        if self.final_center:
            x = x - x.mean(-1, keepdim=True)
        return x if self.final_weight is None else x * self.final_weight

    def read(self, x: Float[Tensor, "... R d"], row_dim: int = -2) -> Float[Tensor, "... r d"]:
        """F, then (MAP head) each pooling head's OV map summed over the heads: read-out rows
        [..., R, d] (rows at `row_dim`) to representation rows [..., r, d]."""
        x = self.final(x)
        if self.pool_W_V is None:
            return x
        x = x.movedim(row_dim, -2)
        pooled = torch.einsum("...hd,hde,hem->...m", x, self.pool_W_V, self.pool_W_O)[..., None, :]
        return pooled.movedim(-2, row_dim)

    def stream(self, x: Float[Tensor, "b p d"]) -> Float[Tensor, "b r d"]:
        """What a residual-stream vector field contributes to the representation."""
        return self.read(torch.einsum("bRp,bpd->bRd", self.weights, x))

    def sublayer_weights(self, layer: int, which: int) -> Float[Tensor, "b r p"]:
        """Query weights for what enters a post-norm sublayer norm (u / sigma_sub), else u."""
        scale = self.sub_scales.get((layer, which))
        return self.weights if scale is None else self.weights / scale[:, None, :]


def _sub_norm(model: HookedViT, layer: int, which: int, x: Tensor) -> Tensor:
    """The linearised post-norm sublayer norm without bias: w * (x - mean(x)) (x already / sigma)."""
    norm = model.blocks[layer].ln1 if which == 1 else model.blocks[layer].ln2
    if model.cfg.norm_type == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x if norm.weight is None else x * norm.weight


def pool_weights(model: HookedViT, n_tokens: int, device=None, dtype=None) -> Float[Tensor, "r p"]:
    """How the representation reads the tokens: one-hot rows for class (and distillation)
    tokens, a uniform row over the pooled tokens for average pooling."""
    cfg = model.cfg
    if cfg.global_pool in ("max", "avgmax"):
        raise NotImplementedError(
            f"global_pool={cfg.global_pool!r}: max pooling picks a token per dimension, which the "
            "component decomposition does not implement (token and average pooling are supported)"
        )
    if cfg.distilled or cfg.global_pool == "token":
        n_read = 2 if cfg.distilled else 1
        return torch.eye(n_read, n_tokens, device=device, dtype=dtype)
    first = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens
    w = torch.zeros(1, n_tokens, device=device, dtype=dtype)
    w[0, first:] = 1.0 / (n_tokens - first)
    if cfg.global_pool == "token_avg":  # [class token; mean patch token], read as two rows
        return torch.cat([torch.eye(1, n_tokens, device=device, dtype=dtype), w])
    return w


def make_readout(model: HookedViT, cache: dict[str, Tensor], n_tokens: int) -> Readout:
    """The batch's readout from the cached norm scales (see `Readout`)."""
    cfg = model.cfg
    ref = cache["hook_pooled"]
    b = ref.shape[0]
    pool_maps = {}
    if cfg.global_pool == "map":  # each pooling head's weights over the tokens: [b, h, p]
        pattern = cache["attn_pool.hook_pattern"][:, :, 0]  # [b, h, p_pooled]
        weights = pattern.new_zeros(b, pattern.shape[1], n_tokens)
        weights[..., n_tokens - pattern.shape[-1]:] = pattern  # the pooled tokens are the last ones
        pool_maps = dict(pool_W_V=model.attn_pool.W_V, pool_W_O=model.attn_pool.W_O)
    else:
        weights = pool_weights(model, n_tokens, ref.device, ref.dtype).expand(b, -1, -1)  # [b, r, p]
    if cfg.final_norm == "token":
        weights = weights / cache["ln_final.hook_scale"][..., 0][:, None, :]  # per-token sigma
    elif cfg.final_norm == "pooled":
        weights = weights / cache["ln_final.hook_scale"].reshape(b, -1, 1)  # sigma of the pooled vector
    w, bias = (model.ln_final.weight, model.ln_final.bias) if model.ln_final is not None else (None, None)
    sub = {}
    if cfg.block_type == "post_norm":
        for layer in range(cfg.n_layers):
            for which in (1, 2):
                key = f"blocks.{layer}.ln{which}.hook_scale"
                if key in cache:
                    sub[(layer, which)] = cache[key][..., 0]
    centre = model.ln_final is not None and cfg.norm_type == "layernorm"  # RMSNorm does not centre
    return Readout(weights, centre, w, bias, sub, **pool_maps)


# ----------------------------------------------------------------------------- decomposition
@dataclass
class Decomposition:
    """Component contributions to the representation of one batch.

    terms: [b, C, r, d], one row per `components[i]`; r = 1 (class token or pooled vector)
        or 2 (distilled: class and distillation token).
    representation: the model's own pooled representation [b, r, d] (`hook_pooled`).
    logits: the model's logits [b, n_classes] (None for a headless model).
    terms.sum(1) equals representation to float precision.
    """

    terms: Float[Tensor, "b C r d"]
    components: list[Component]
    representation: Float[Tensor, "b r d"]
    logits: Optional[Tensor]
    readout: Readout
    start_layer: int = 0
    biases: BiasMode = "separate"
    bias_total: Optional[Tensor] = None  # with biases="split": the total that was spread

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def total(self) -> Float[Tensor, "b r d"]:
        return self.terms.sum(1)

    def flat(self) -> Float[Tensor, "b C rd"]:
        """Terms with the read-out vectors concatenated: the space the applications use."""
        return self.terms.flatten(2)

    def index(self, kind: Optional[str] = None, layer: Optional[int] = None) -> list[int]:
        """Positions of the components of a kind and/or layer."""
        return [i for i, c in enumerate(self.components)
                if (kind is None or c.kind == kind) and (layer is None or c.layer == layer)]

    @torch.no_grad()
    def logit_terms(self, model: HookedViT) -> tuple[Float[Tensor, "b C c"], list[Component]]:
        """The classifier head applied to every term; the head bias is one more term ("b_U"),
        or spread evenly with biases="split" / "reference". Sums to the model's logits."""
        logits = readout_logits(model, self.terms)
        if not model.has_unembed:
            return logits, list(self.components)
        b_U = model.b_U.expand(logits.shape[0], 1, -1)
        if self.biases in ("split", "reference"):  # vit-decompose divides b_U over its inputs too
            return logits + b_U / len(self.components), list(self.components)
        return torch.cat([logits, b_U], 1), [*self.components, Component("b_U")]

    def sublayer_terms(self) -> tuple[Float[Tensor, "b S r d"], list[str]]:
        """Terms grouped by sublayer: the stream in, then [attn_time_l (temporal heads, their
        b_O) on divided space-time models], attn_l (heads, b_O, ln1.b) and mlp_l (mlp, b_out,
        ln2.b) per layer, then the final norm bias."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(self.components):
            if c.layer is None:
                key = c.kind
            elif c.kind in ("time_head", "attn_time.b_O"):
                key = f"L{c.layer}.attn_time"
            else:
                key = f"L{c.layer}.{'attn' if c.kind in ('head', 'b_O', 'ln1.b') else 'mlp'}"
            groups.setdefault(key, []).append(i)
        stacked = torch.stack([self.terms[:, idx].sum(1) for idx in groups.values()], 1)
        return stacked, list(groups)


def readout_logits(model: HookedViT, x: Float[Tensor, "... r d"]) -> Float[Tensor, "... c"]:
    """The classifier head on representation-space vectors, without its bias.

    Distilled models: (head(class) + head_dist(distillation)) / 2, as timm at eval.
    global_pool="token_avg": the head on the concatenated [class, mean patch] rows. CLIP:
    the image projection and any head on it (`W_U`). Headless models return the vector
    itself (the mean of the pair for distilled ones, the concatenation for token_avg).
    """
    if model.cfg.global_pool == "token_avg":
        flat = x.flatten(-2)
        return flat if model.head is None else flat @ model.head.weight.T
    if not model.has_unembed:
        return x.mean(-2)
    if model.head_dist is not None:
        return (x[..., 0, :] @ model.head.weight.T + x[..., 1, :] @ model.head_dist.weight.T) / 2
    return x[..., 0, :] @ model.W_U


def _cache_names(model: HookedViT, start_layer: int) -> list[str]:
    cfg = model.cfg
    names = [f"blocks.{start_layer}.hook_resid_pre", "hook_pooled"]
    if model.has_unembed:
        names.append("hook_logits")
    if cfg.final_norm:
        names.append("ln_final.hook_scale")
    if cfg.global_pool == "map":
        names += ["attn_pool.hook_pattern"] + (["attn_pool.hook_mlp_out"] if cfg.attn_pool_mlp else [])
    for layer in range(start_layer, cfg.n_layers):
        # Differential attention: W_O reads each head's sub-normalised z (a per-head RMSNorm keeps heads apart).
        z_name = "attn.sub_norm.hook_normalized" if cfg.diff_attn else "attn.hook_z"
        names += [f"blocks.{layer}.{z_name}", f"blocks.{layer}.hook_mlp_out"]
        if cfg.attention_type == "divided_space_time":
            names.append(f"blocks.{layer}.attn_time.hook_z")
        if cfg.block_type == "post_norm":
            names += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"]
    return names


def _check_supported(model: HookedViT, start_layer: int) -> None:
    cfg = model.cfg
    if not 0 <= start_layer <= cfg.n_layers:
        raise UserError(f"start_layer={start_layer} is outside 0..{cfg.n_layers}")
    pool_weights(model, cfg.n_ctx)  # refuses max pooling
    refusals = {
        "final_norm": (cfg.global_pool == "map" and cfg.final_norm == "pooled", "a norm after an attention-pooling "
                       "head would need the head's MLP linearised too; only a per-token final norm (or none) is "
                       "decomposed with a MAP head"),
        "attention_type": (cfg.attention_type == "divided_space_time" and cfg.block_type == "post_norm",
                           "divided space-time attention is decomposed for pre-norm blocks only"),
        "attn_pool_layers": (cfg.global_pool == "map" and (cfg.attn_pool_layers > 0 or cfg.attn_pool_kv_norm),
                             "an attentive probe with its own self-attention blocks or a norm before its keys and "
                             "values (V-JEPA 2's) is nonlinear in the tokens before the pooling weights apply"),
        "attn_norm": (cfg.attn_norm, "a norm over the heads' outputs (scale_attn_norm) mixes the heads before W_O, "
                      "so a head's output is not its own term"),
    }
    for flag, (refused, reason) in refusals.items():
        if refused:
            raise UnsupportedModelError(f"decomposition refused ({flag}): {reason}")


@torch.no_grad()
def decompose(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    *,
    start_layer: int = 0,
    biases: BiasMode = "separate",
    fwd_hooks: Sequence = (),
) -> Decomposition:
    """Decompose the representation of a batch into components (one forward pass).

    Args:
        start_layer: components start at this block; the stream entering it is one
            "resid_in" term ("embed" when 0).
        biases: "separate" keeps every bias as its own component; "split" spreads their sum
            evenly over the other components; "reference" splits each bias where
            Balasubramanian et al.'s vit-decompose code puts it (`split_reference`; pre-norm
            models): b_O evenly over its layer's heads, b_out into its MLP, and the final
            norm's constant (its bias minus w * mean / sigma) evenly over all components,
            which are then not centred.
        fwd_hooks: extra hooks active during the pass (e.g. an intervention); the
            decomposition is of the hooked model's representation.

    Components, in order: embed/resid_in; per layer: heads 0..H-1, b_O, [ln1.b], mlp, b_out,
    [ln2.b] (post-norm only in brackets); ln_final.b.
    """
    _check_supported(model, start_layer)
    if biases not in BIAS_MODES:
        raise UserError(f"biases must be one of {BIAS_MODES}, got {biases!r}")
    if biases == "reference" and model.cfg.block_type == "post_norm":
        raise UserError("biases='reference' follows vit-decompose, which has no post-norm blocks; use 'separate' "
                         "or 'split'")
    if biases == "reference" and model.cfg.global_pool == "map":
        raise UserError("biases='reference' follows vit-decompose, which has no attention-pooling head; use "
                         "'separate' or 'split'")
    return _from_cache(model, _decomposition_cache(model, images, start_layer, fwd_hooks), start_layer, biases)


def _decomposition_cache(model: HookedViT, images: Tensor, start_layer: int, fwd_hooks: Sequence) -> dict[str, Tensor]:
    names = _cache_names(model, start_layer)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        _, cache = model.run_with_cache(images, names_filter=lambda n: n in names, return_cache_object=False,
                                        return_type="logits" if model.has_unembed else "pooled")
    return cache


@dataclass
class TimeTerms:
    """Components split by the time position of the token the representation reads them from.

    terms[b, g, C, r, d]: component C's contribution through the tokens of group g (groups:
    "prefix" when the model has prefix tokens, then "t0", "t1", ...). Summed over g they are
    `decomposition.terms`, except the final norm's bias, a constant of no token (zero in
    every group)."""

    terms: Float[Tensor, "b g C r d"]
    groups: list[str]
    decomposition: Decomposition

    @property
    def components(self) -> list[Component]:
        return self.decomposition.components


@torch.no_grad()
def per_time_terms(model: HookedViT, clips: Float[Tensor, "b t c h w"], *, start_layer: int = 0,
                   fwd_hooks: Sequence = ()) -> TimeTerms:
    """`decompose` (biases "separate") with every component split by the time position of
    the read-out token (video models; one forward pass). The read-out is linear in its
    per-token weights, so restricting them to one time position's tokens gives that
    position's share of every component."""
    from hooked_vit.tokens import token_coords

    cfg = model.cfg
    if not cfg.is_video:
        raise UserError(f"{cfg.model_name} is an image model (num_frames not set); per-time terms need a video model")
    if cfg.global_pool == "map":  # the pooling head's MLP term is a function of all the tokens at once
        raise UserError("per-time terms are refused with an attention-pooling head (e.g. V-JEPA 2's probe): its MLP "
                         "term depends on every time position at once; use decompose() for the whole clip")
    _check_supported(model, start_layer)
    cache = _decomposition_cache(model, clips, start_layer, fwd_hooks)
    dec = _from_cache(model, cache, start_layer, "separate")
    coords = token_coords(model)
    groups = (["prefix"] if cfg.n_prefix_tokens else []) + [f"t{t}" for t in range(cfg.n_time)]
    ref = dec.terms
    masks = [torch.tensor([(c is None) if g == "prefix" else (c is not None and c[0] == int(g[1:])) for c in coords],
                          device=ref.device, dtype=ref.dtype) for g in groups]
    terms = torch.stack([_from_cache(model, cache, start_layer, "separate", mask).terms for mask in masks], 1)
    return TimeTerms(terms, groups, dec)


def _from_cache(model: HookedViT, cache: dict[str, Tensor], start_layer: int, biases: BiasMode,
                position_mask: Optional[Tensor] = None) -> Decomposition:
    """position_mask [p]: read the representation from those tokens only (`per_time_terms`);
    the final norm's bias, a constant of no token, is then zero."""
    cfg = model.cfg
    resid_in = cache[f"blocks.{start_layer}.hook_resid_pre"]
    readout = make_readout(model, cache, resid_in.shape[1])
    if position_mask is not None:
        bias = None if readout.final_bias is None else torch.zeros_like(readout.final_bias)
        readout = replace(readout, weights=readout.weights * position_mask, final_bias=bias)
    if biases == "reference":  # vit-decompose scales components without centring them
        readout = replace(readout, final_center=False)
    comps = [Component("embed" if start_layer == 0 else "resid_in")]
    terms = [readout.stream(resid_in)[:, None]]
    for layer in range(start_layer, cfg.n_layers):
        layer_terms, layer_comps = _layer_terms(model, readout, cache, layer)
        terms.append(layer_terms)
        comps += layer_comps
    if readout.final_bias is not None:  # the pooling weights of each read-out row sum to 1
        comps.append(Component("ln_final.b"))
        rows = readout.final_bias.expand(resid_in.shape[0], readout.weights.shape[1], -1)
        terms.append(_unfinal(readout, rows)[:, None])
    if cfg.global_pool == "map":
        pool = model.attn_pool
        constant = pool.b_O if pool.b_V is None else pool.b_O + torch.einsum("he,hem->m", pool.b_V, pool.W_O)
        if cfg.attn_pool_residual:  # the latent added to the attention output: a constant too
            constant = constant + pool.latent[0, 0]
        b = resid_in.shape[0]
        comps.append(Component("attn_pool.b"))
        terms.append(constant.expand(b, 1, 1, -1).clone())
        if cfg.attn_pool_mlp:  # AIMv2's head has no MLP: the pooled vector is the attention output
            comps.append(Component("attn_pool.mlp"))
            terms.append(cache["attn_pool.hook_mlp_out"][:, None, None])
    pooled = cache["hook_pooled"]
    rep = pooled.reshape(pooled.shape[0], -1, cfg.d_model)  # [b, r, d]; token_avg's [b, 2d] as two rows
    dec = Decomposition(torch.cat(terms, 1), comps, rep, cache.get("hook_logits"), readout, start_layer)
    if biases == "reference":
        return split_reference(dec)
    return split_biases(dec) if biases == "split" else dec


def _unfinal(readout: Readout, rows: Tensor) -> Tensor:
    """Rows already in the final norm's output space (its bias) through the rest of the read-out."""
    return replace(readout, final_center=False, final_weight=None).read(rows)


def _layer_terms(model: HookedViT, readout: Readout, cache: dict[str, Tensor], layer: int
                 ) -> tuple[Tensor, list[Component]]:
    """Heads, b_O, [ln1.b], mlp, b_out, [ln2.b] of one layer: [b, n, r, d]."""
    block = model.blocks[layer]
    post = model.cfg.block_type == "post_norm"
    u = readout.weights
    u1, u2 = readout.sublayer_weights(layer, 1), readout.sublayer_weights(layer, 2)
    U, U1, U2 = (w.sum(-1)[..., None] for w in (u, u1, u2))  # [b, r, 1]: total read-out weight
    sub1 = (lambda x: _sub_norm(model, layer, 1, x)) if post else (lambda x: x)
    sub2 = (lambda x: _sub_norm(model, layer, 2, x)) if post else (lambda x: x)

    out, comps = [], []
    divided = model.cfg.attention_type == "divided_space_time"
    if divided:  # the temporal attention first: it writes to the patch tokens only (pre-norm blocks)
        z_time = _time_z_per_token(model, cache[f"blocks.{layer}.attn_time.hook_z"])  # [b, p, h, e]
        n = model.cfg.n_prefix_tokens
        heads = torch.einsum("brp,bphe,hed->bhrd", u, z_time, block.attn_time.W_O)
        out += [readout.read(heads), readout.read(block.attn_time.b_O * u[..., n:].sum(-1)[..., None])[:, None]]
        comps += [Component("time_head", layer, h) for h in range(model.cfg.n_heads)] + [Component("attn_time.b_O", layer)]
    if model.cfg.diff_attn:  # what W_O reads: sub_norm(z) * (1 - lambda_init), each head on its own
        z = cache[f"blocks.{layer}.attn.sub_norm.hook_normalized"] * (1 - block.attn.lambda_init)
    else:
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [b, p, h, e]; divided: [b, t, prefix + s, h, e]
    if divided:
        z = _space_z_per_token(model, z)
    # Read out z before W_O: [b, r, h, e] instead of [b, p, h, d].
    heads = torch.einsum("brp,bphe,hed->bhrd", u1, z, block.attn.W_O)
    out += [readout.read(sub1(heads)), readout.read(sub1(block.attn.b_O * U1))[:, None]]
    comps += [Component("head", layer, h) for h in range(model.cfg.n_heads)] + [Component("b_O", layer)]
    if post and block.ln1.bias is not None:
        out.append(readout.read(block.ln1.bias * U)[:, None])
        comps.append(Component("ln1.b", layer))

    mlp_out = cache[f"blocks.{layer}.hook_mlp_out"]  # what the block adds: exact
    b_out = block.mlp.b_out
    if post:
        # mlp_out = w2 * centre(m) / s2 + b2 with m = post @ W_out + b_out.
        b2 = block.ln2.bias if block.ln2.bias is not None else torch.zeros_like(b_out)
        mlp = torch.einsum("brp,bpd->brd", u, mlp_out) - b2 * U - _sub_norm(model, layer, 2, b_out) * U2
    else:
        mlp = torch.einsum("brp,bpd->brd", u, mlp_out) - b_out * U
    out += [readout.read(mlp)[:, None], readout.read(sub2(b_out * U2))[:, None]]
    comps += [Component("mlp", layer), Component("b_out", layer)]
    if post and block.ln2.bias is not None:
        out.append(readout.read(block.ln2.bias * U)[:, None])
        comps.append(Component("ln2.b", layer))
    return torch.cat(out, 1), comps


def _space_z_per_token(model: HookedViT, z: Float[Tensor, "b t g h e"]) -> Float[Tensor, "b p h e"]:
    """Divided attention's spatial z (grouped by frame, prefix tokens in every frame) on the
    token sequence: a prefix token's z is its mean over the frames (its output is that mean,
    and W_O is linear), a patch token's is its own frame's."""
    n = model.cfg.n_prefix_tokens
    return torch.cat([z[:, :, :n].mean(1), einops.rearrange(z[:, :, n:], "b t s h e -> b (t s) h e")], 1)


def _time_z_per_token(model: HookedViT, z: Float[Tensor, "b s t h e"]) -> Float[Tensor, "b p h e"]:
    """Divided attention's temporal z (grouped by (row, col)) on the token sequence; zero on
    the prefix tokens (the temporal attention does not write to them)."""
    n = model.cfg.n_prefix_tokens
    patches = einops.rearrange(z, "b s t h e -> b (t s) h e")
    return torch.cat([patches.new_zeros(patches.shape[0], n, *patches.shape[2:]), patches], 1)


def split_biases(dec: Decomposition) -> Decomposition:
    """Spread the sum of the bias terms evenly over the other components (the reference
    convention): each non-bias term gets bias_total / n. The sum is unchanged."""
    if dec.biases == "split":
        return dec
    keep = [i for i, c in enumerate(dec.components) if not c.is_bias]
    bias = [i for i, c in enumerate(dec.components) if c.is_bias]
    total = dec.terms[:, bias].sum(1)
    terms = dec.terms[:, keep] + total[:, None] / len(keep)
    return replace(dec, terms=terms, components=[dec.components[i] for i in keep], biases="split",
                   bias_total=total)


def split_reference(dec: Decomposition) -> Decomposition:
    """vit-decompose's placement of the biases (its linear_decompose: a linear layer's bias
    is divided evenly over the components entering it, a LayerNorm's constant likewise):
    each layer's b_O evenly over its heads (attn_time.b_O over its temporal heads), b_out into its MLP term, and the final norm's
    constant rep - sum(uncentred terms) evenly over all components. `dec` must have been
    built with an uncentred readout (`decompose(..., biases="reference")` does that)."""
    comps, terms = dec.components, dec.terms
    out = terms.clone()
    for i, c in enumerate(comps):
        if c.kind == "b_O":
            heads = [j for j, h in enumerate(comps) if h.kind == "head" and h.layer == c.layer]
            out[:, heads] += terms[:, i : i + 1] / len(heads)
        elif c.kind == "attn_time.b_O":
            heads = [j for j, h in enumerate(comps) if h.kind == "time_head" and h.layer == c.layer]
            out[:, heads] += terms[:, i : i + 1] / len(heads)
        elif c.kind == "b_out":
            (mlp,) = [j for j, m in enumerate(comps) if m.kind == "mlp" and m.layer == c.layer]
            out[:, mlp] += terms[:, i]
    keep = [i for i, c in enumerate(comps) if not c.is_bias]
    out = out[:, keep]
    constant = dec.representation - out.sum(1)  # the final norm's bias - w * mean(x) / sigma
    return replace(dec, terms=out + constant[:, None] / len(keep), components=[comps[i] for i in keep],
                   biases="reference", bias_total=constant)


# ----------------------------------------------------------------------------- token terms
@dataclass
class TokenTerms:
    """Source-token terms of some heads of one layer: terms[b, r, h, k, d] is what head
    heads[h] contributes to the representation through source token k."""

    layer: int
    heads: list[int]
    terms: Float[Tensor, "b r h k d"]


@torch.no_grad()
def token_terms(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    dec: Decomposition,
    *,
    layers: Optional[Sequence[int]] = None,
    heads_per_chunk: Optional[int] = None,
    fwd_hooks: Sequence = (),
) -> Iterator[TokenTerms]:
    """Split head terms by source token, one layer and head chunk at a time.

    Runs one more forward pass with the explicit attention path: each layer's pattern is
    reduced in its hook to the effective read-out row sum_q u[r, q] A[h, q, k] (the read-out
    weights `dec.readout` fix), so only [b, r, h, k] per layer is kept. Each yielded chunk is
    [b, r, heads_per_chunk, k, d]; summing over k gives the head terms of `dec` (biases
    "separate"; with "split" the spread bias share is not in the token terms).

    Differential attention (cfg.diff_attn): the pattern is map1 - lambda * map2 (what multiplies
    v), and each query's per-head RMS sub-norm scale s = rms(z) is held at its value in this pass
    (as the decomposition holds the final norm's scale), so the head's output is linear in the
    values: term(k) = sum_q u[q] A[q, k] / s[q] * v_k * sub_norm.w * (1 - lambda_init) W_O.
    """
    cfg = model.cfg
    if cfg.attention_type == "divided_space_time":
        raise UserError("token_terms splits heads by source token through the joint [b, h, q, k] pattern; divided "
                         "space-time attention's two grouped patterns per block are not split (use decompose / "
                         "per_time_terms)")
    layers = list(range(dec.start_layer, cfg.n_layers)) if layers is None else list(layers)
    if any(l < dec.start_layer or l >= cfg.n_layers for l in layers):
        raise UserError(f"layers {layers} must lie in {dec.start_layer}..{cfg.n_layers - 1}")
    readout = dec.readout
    rows: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}

    def pattern_hook(pattern: Tensor, hook) -> None:
        layer = hook.layer()
        if cfg.diff_attn:  # hook_v fired first: the sub-norm's scale of each query's z, held fixed
            pattern = pattern / _diff_sub_scale(model, layer, pattern, values[layer])[..., None]
        rows[layer] = torch.einsum("bRq,bhqk->bRhk", readout.sublayer_weights(layer, 1), pattern)

    def value_hook(v: Tensor, hook) -> None:
        values[hook.layer()] = v

    hooks = list(fwd_hooks)
    for layer in layers:
        hooks += [(f"blocks.{layer}.attn.hook_pattern", pattern_hook), (f"blocks.{layer}.attn.hook_v", value_hook)]
    model.run_with_hooks(images, fwd_hooks=hooks, return_type=None, stop_at_layer=max(layers) + 1)
    chunk = heads_per_chunk or cfg.n_heads
    post = cfg.block_type == "post_norm"
    for layer in layers:
        W_O = model.blocks[layer].attn.W_O  # [h, e, d]
        if cfg.diff_attn:  # the sub-norm's weight and (1 - lambda_init) act on each head's z before W_O
            attn = model.blocks[layer].attn
            W_O = W_O * (attn.sub_norm.weight * (1 - attn.lambda_init))[None, :, None]
        for start in range(0, cfg.n_heads, chunk):
            hs = list(range(start, min(start + chunk, cfg.n_heads)))
            vo = torch.einsum("bkhe,hed->bhkd", values[layer][:, :, hs], W_O[hs])  # [b, h, k, d]
            terms = rows[layer][:, :, hs, :, None] * vo[:, None]  # [b, r, h, k, d]
            if post:
                terms = _sub_norm(model, layer, 1, terms)
            yield TokenTerms(layer, hs, readout.read(terms, row_dim=1))
        del values[layer], rows[layer]


def _diff_sub_scale(model: HookedViT, layer: int, pattern: Float[Tensor, "b h q k"],
                    v: Float[Tensor, "b k h e"]) -> Float[Tensor, "b h q"]:
    """sqrt(mean(z^2) + eps) of z = pattern @ v: differential attention's sub-norm scale."""
    z = torch.einsum("bhqk,bkhe->bhqe", pattern, v)
    return (z.pow(2).mean(-1) + model.blocks[layer].attn.sub_norm.eps).sqrt()


def head_token_terms(model: HookedViT, images: Tensor, dec: Decomposition, layer: int) -> Float[Tensor, "b h r k d"]:
    """All source-token terms of one layer's heads, materialised: [b, h, r, k, d]."""
    (chunk,) = token_terms(model, images, dec, layers=[layer])
    return chunk.terms.transpose(1, 2)


# ----------------------------------------------------------------------------- datasets
@dataclass
class DecomposedSet:
    """Decompositions of many images, kept on the CPU: terms [N, C, r, d] and the scalar
    metadata of the items (label, group, background, index, ...), as [N] tensors."""

    terms: Float[Tensor, "N C r d"]
    components: list[Component]
    meta: dict[str, Tensor]
    biases: BiasMode = "separate"

    def flat(self) -> Float[Tensor, "N C rd"]:
        return self.terms.flatten(2)

    def total(self) -> Float[Tensor, "N r d"]:
        return self.terms.sum(1)

    def __len__(self) -> int:
        return self.terms.shape[0]


def decompose_dataset(
    model: HookedViT,
    dataset,
    *,
    batch_size: int = 64,
    limit: Optional[int] = None,
    start_layer: int = 0,
    biases: BiasMode = "separate",
    fwd_hooks: Sequence = (),
    progress: bool = True,
) -> DecomposedSet:
    """Decompose the first `limit` items of a dataset (items as in `circuits.data`).

    Holds N x C x r x d floats: fine for a reference set of a few thousand images; stream
    `decompose` batch by batch for more.
    """
    from circuits.data import make_loader

    terms, meta, comps = [], {}, None
    for batch in tqdm(make_loader(dataset, batch_size, limit=limit), desc="decompose", disable=not progress):
        if batch is None:
            continue
        dec = decompose(model, model.to_input(batch["image"]), start_layer=start_layer, biases=biases,
                        fwd_hooks=fwd_hooks)
        terms.append(dec.terms.cpu())
        comps = dec.components
        for key, value in batch.items():
            if torch.is_tensor(value) and value.ndim == 1:
                meta.setdefault(key, []).append(value.cpu())
    if comps is None:
        raise UserError("no readable items to decompose")
    return DecomposedSet(torch.cat(terms), comps, {k: torch.cat(v) for k, v in meta.items()}, biases)
