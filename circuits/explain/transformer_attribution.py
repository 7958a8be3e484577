"""Transformer attribution (Chefer, Gur & Wolf, "Transformer Interpretability Beyond
Attention Visualization", CVPR 2021): LRP relevance propagated from the target class
through every layer, combined with the attention gradients and rolled out over blocks.

Relevance starts as the one-hot target vector on the logits and is propagated down with
these rules (Chefer et al. 2021, Sec. 3; the authors' Transformer-Explainability code):
- linear layers (head, qkv, proj, fc1, fc2): the z+ (alpha=1, beta=0) rule, biases left
  out: R_in = x+ * (S @ W+) + x- * (S @ W-), S = R / (x+ W+^T + x- W-^T);
- every other map y = f(x) (LayerNorm, the activation, softmax, the token selection, the
  two attention products): gradient x input, R_in = x * J_f^T (R / y) (both operands of a
  product, each then halved in attention: the product's relevance split between them);
- residual additions y = a + b: R_a = a * R / y, R_b likewise, each rescaled so the two
  sums share sum(R) in the ratio |sum R_a| : |sum R_b| (per image; the authors run one
  image at a time, so this is their rule);
- a residual branch point: the relevances of both uses add.
Division by zero gives zero (`safe_divide`). Everything runs in float64: a LayerNorm is
invariant to the scale of its input, so gradient x input through it conserves no
relevance (the sum is zero but for the eps term), and the residual rule then rescales by
that near-zero sum; in float32 its sign is set by rounding (see docs/explanations.md). The relevance of block l's attention pattern,
Rbar_l = A_l * J^T(R_z / z) / 2 at the product z = A v, is combined with the gradient
g_l = d y_t / d A_l: Abar_l = mean_h clamp(g_l * Rbar_l, min=0), and
C = prod_{l >= start_layer} (I + Abar_l) (the last block leftmost, rows not normalised);
the map is C[CLS, image tokens].

Supported: pre-norm class-token models (ViT, DeiT, DeiT-3, DINOv2, CLIP, registers), as
the paper. Other families are refused: their pooling or norms have no rule in the paper.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.explain.attention import from_layer
from circuits.explain.trace import AttentionTrace
from hooked_vit import HookedViTConfig
from hooked_vit.errors import UserError

_BLOCK_ACTS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
               "attn.hook_attn_scores", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized",
               "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def supported(cfg: HookedViTConfig) -> bool:
    """Whether the paper's rules cover this model (see the module doc)."""
    return cfg.block_type == "pre_norm" and cfg.global_pool == "token" and not cfg.distilled


def check_supported(cfg: HookedViTConfig) -> None:
    if not supported(cfg):
        raise UserError("transformer_attribution supports pre-norm class-token models (no distillation token), "
                         f"got block_type={cfg.block_type!r}, global_pool={cfg.global_pool!r}, "
                         f"distilled={cfg.distilled}; use gae for this model")


def act_names(cfg: HookedViTConfig, **_: object) -> list[str]:
    """The hook points the relevance propagation reads."""
    check_supported(cfg)
    return [f"blocks.{l}.{name}" for l in range(cfg.n_layers) for name in _BLOCK_ACTS]


# ----------------------------------------------------------------------------- LRP rules
def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    """a / (b + 1e-9), 0 where b == 0: the authors' stabiliser (it shifts every
    denominator by 1e-9, which matters for the near-zero totals of `residual_add`)."""
    den = b + 1e-9
    den = torch.where(den == 0, torch.full_like(den, 1e-9), den)
    return torch.where(b != 0, a / den, torch.zeros_like(a))


def grad_x_input(fn: Callable[..., Tensor], inputs: Sequence[Tensor], r: Tensor) -> list[Tensor]:
    """R_in = x * J_f^T (R / f(x)) for every input x of y = f(*inputs)."""
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        y = fn(*xs)
        grads = torch.autograd.grad(y, xs, safe_divide(r, y.detach()))
    return [x.detach() * g for x, g in zip(xs, grads)]


def linear_zplus(x: Float[Tensor, "... i"], weight: Float[Tensor, "o i"], r: Float[Tensor, "... o"]) -> Tensor:
    """The z+ rule (alpha=1, beta=0) of a linear layer, bias left out."""
    x, w = x.detach().double(), weight.detach().double()
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    s = safe_divide(r, xp @ wp.T + xn @ wn.T)
    return xp * (s @ wp) + xn * (s @ wn)


def residual_add(a: Float[Tensor, "b p d"], b: Float[Tensor, "b p d"], r: Float[Tensor, "b p d"]) -> tuple[Tensor, Tensor]:
    """Relevance of y = a + b split between a and b (see the module doc), per image."""
    ra, rb = grad_x_input(torch.add, (a, b), r)
    sa, sb, total = ra.sum((1, 2), keepdim=True), rb.sum((1, 2), keepdim=True), r.sum((1, 2), keepdim=True)
    share = sa.abs() + sb.abs()
    return (ra * safe_divide(safe_divide(sa.abs(), share) * total, sa),
            rb * safe_divide(safe_divide(sb.abs(), share) * total, sb))


# ----------------------------------------------------------------------------- the model
def _norm(ln) -> Callable[[Tensor], Tensor]:
    """A LayerNorm in float64 (identity where the model has none)."""
    if ln is None:
        return lambda t: t
    w, b = (None if t is None else t.detach().double() for t in (ln.weight, ln.bias))
    return lambda t: F.layer_norm(t, (ln.d_model,), w, b, ln.eps)


def _scaled(linear: torch.nn.Linear, gamma) -> Tensor:
    """The weight of x -> linear(x) * gamma (LayerScale folded in)."""
    return linear.weight if gamma is None else linear.weight * gamma[:, None]


def _mlp(trace: AttentionTrace, l: int, r: Tensor) -> Tensor:
    """Relevance of ln2's input from that of the MLP output."""
    block, acts, p = trace.model.blocks[l], trace.acts, f"blocks.{l}."
    r = linear_zplus(acts[p + "mlp.hook_post"], _scaled(block.mlp.fc2, block.mlp.ls_gamma), r)
    (r,) = grad_x_input(block.mlp.act, (acts[p + "mlp.hook_pre"],), r)
    r = linear_zplus(acts[p + "ln2.hook_normalized"], block.mlp.fc1.weight, r)
    (r,) = grad_x_input(_norm(block.ln2), (acts[p + "hook_resid_mid"],), r)
    return r


def _attention(trace: AttentionTrace, l: int, r: Tensor) -> tuple[Tensor, Tensor]:
    """(relevance of ln1's input, relevance of the attention pattern [b, h, q, k])."""
    block, acts, p = trace.model.blocks[l], trace.acts, f"blocks.{l}."
    b, n, h, e = acts[p + "attn.hook_z"].shape
    r_z = linear_zplus(acts[p + "attn.hook_z"].reshape(b, n, h * e), _scaled(block.attn.proj, block.attn.ls_gamma), r)
    heads = lambda t: t.transpose(1, 2)  # [b, p, h, e] -> [b, h, p, e]
    q, k, v = (heads(acts[p + f"attn.hook_{name}"]) for name in "qkv")
    r_a, r_v = (t / 2 for t in grad_x_input(torch.matmul, (trace.patterns[l], v), heads(r_z.reshape(b, n, h, e))))
    (r_s,) = grad_x_input(lambda s: s.softmax(-1), (acts[p + "attn.hook_attn_scores"],), r_a)
    r_q, r_k = (t / 2 for t in grad_x_input(lambda a, c: a @ c.transpose(-1, -2), (q, k), r_s))
    r_qkv = torch.stack([heads(t) for t in (r_q, r_k, r_v)], 2).reshape(b, n, 3 * h * e)  # qkv's layout
    r = linear_zplus(acts[p + "ln1.hook_normalized"], block.attn.qkv.weight, r_qkv)
    (r,) = grad_x_input(_norm(block.ln1), (acts[p + "hook_resid_pre"],), r)
    return r, r_a


def _readout_relevance(trace: AttentionTrace) -> Float[Tensor, "b p d"]:
    """Relevance of the last block's output: one-hot target -> head -> final norm -> class token."""
    model, last = trace.model, trace.acts[f"blocks.{trace.model.cfg.n_layers - 1}.hook_resid_post"]
    model.require_head()
    onehot = torch.nn.functional.one_hot(trace.targets, model.cfg.n_classes).double()
    norm, cls = _norm(model.ln_final), last[:, 0].detach().double()
    r = linear_zplus(norm(cls), model.W_U.T, onehot)  # CLIP: projection and text head folded
    (r,) = grad_x_input(norm, (cls,), r)
    out = torch.zeros(last.shape, dtype=torch.double, device=last.device)
    out[:, 0] = r * (cls != 0)  # the token selection: gradient x input of an index
    return out


def attention_relevances(trace: AttentionTrace) -> list[Float[Tensor, "b h p p"]]:
    """Rbar_l for every block: the LRP relevance of each attention pattern."""
    check_supported(trace.model.cfg)
    r, out = _readout_relevance(trace), []
    for l in reversed(range(trace.model.cfg.n_layers)):
        acts, p = trace.acts, f"blocks.{l}."
        r_skip, r_mlp = residual_add(acts[p + "hook_resid_mid"], acts[p + "hook_mlp_out"], r)
        r = (r_skip + _mlp(trace, l, r_mlp)) * (acts[p + "hook_resid_mid"] != 0)  # the branch point
        r_skip, r_attn = residual_add(acts[p + "hook_resid_pre"], acts[p + "hook_attn_out"], r)
        r_in, r_a = _attention(trace, l, r_attn)
        r = (r_skip + r_in) * (acts[p + "hook_resid_pre"] != 0)
        out.append(r_a)
    return out[::-1]


def transformer_attribution(trace: AttentionTrace, *, start_layer: int = 0) -> Tensor:
    """Chefer et al. 2021's transformer attribution map over image tokens. [b, n_patches]"""
    grads = trace.target_grads()
    rels = attention_relevances(trace)
    p = trace.n_tokens
    c = torch.eye(p, dtype=torch.double, device=trace.logits.device).expand(rels[0].shape[0], -1, -1)
    for g, rel in zip(from_layer(grads, start_layer), from_layer(rels, start_layer)):
        c = (torch.eye(p, dtype=c.dtype, device=c.device) + (g.detach().double() * rel).clamp(min=0).mean(1)) @ c
    return trace.image_tokens(trace.read_row(c))
