"""Transformer attribution (Chefer, Gur & Wolf, "Transformer Interpretability Beyond
Attention Visualization", CVPR 2021): LRP relevance propagated from the target class
through every layer, combined with the attention gradients and rolled out over blocks.

The propagation follows the authors' code (github.com/hila-chefer/Transformer-Explainability,
`modules/layers_ours.py`, `baselines/ViT/ViT_LRP.py`, `LRP.generate_LRP(method=
"transformer_attribution")`); tests/test_chefer_reference.py checks the maps against theirs.
Relevance starts as the one-hot target vector on the logits and goes down with these rules:
- linear layers (head, qkv, proj, fc1, fc2): LRP alpha-beta with alpha=1, beta=0 (z+),
  biases left out: R_in = x+ * (S @ W+) + x- * (S @ W-), S = R / (x+ W+^T + x- W-^T);
- LayerNorm (ln1, ln2, ln_final), the MLP activation, softmax and dropout: relevance passes
  through unchanged (their `RelProp.relprop`); so the softmax's input gets the pattern's
  relevance, and the attention scale (not a module of theirs) is skipped;
- the two attention products z = A v and s = q k^T and the class-token selection:
  gradient x input, R_in = x * J^T (R / y), each operand of a product then halved;
- residual additions y = a + b: R_a = a * R / y, R_b likewise, then rescaled so that the
  two sums share sum(R) in the ratio |sum R_a| : |sum R_b| (their `Add`; per image: the
  authors run one image at a time);
- a residual branch point x -> (x, x): R_x = x * (R_1 / x + R_2 / x) (their `Clone`).
Division is the authors' `safe_divide`: a / (b + 1e-9), 0 where b = 0. The rules run in
float64 on the traced activations. The relevance of block l's attention pattern is the
pattern's half at z = A v, Rbar_l = A * J^T(R_z / z) / 2; with g_l = d y_t / d A_l,
Abar_l = mean_h clamp(g_l * Rbar_l, min=0) and C = prod_{l >= start_layer} (I + Abar_l)
(the last block leftmost, rows not normalised); the map is C[CLS, image tokens].

Supported: pre-norm class-token models (ViT, DeiT, DeiT-3, DINOv2, CLIP, registers), as
the paper; LayerScale gammas are folded into the linear layer before them. Other families
are refused: their pooling or norms have no rule in the paper.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.explain.attention import from_layer
from circuits.explain.trace import AttentionTrace
from hooked_vit import HookedViTConfig
from hooked_vit.errors import UserError

_BLOCK_ACTS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
               "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_post",
               "hook_mlp_out")


def supported(cfg: HookedViTConfig) -> bool:
    """Whether the paper's rules cover this model (see the module doc)."""
    return cfg.block_type == "pre_norm" and cfg.global_pool == "token" and not cfg.distilled


def check_supported(cfg: HookedViTConfig) -> None:
    if supported(cfg) and (cfg.mlp_type != "mlp" or cfg.mlp_norm or cfg.parallel_attn_mlp):
        raise UserError("transformer_attribution's relevance rules cover fc1 -> activation -> fc2 MLPs in sequential "
                         f"blocks; this model has mlp_type={cfg.mlp_type!r}, mlp_norm={cfg.mlp_norm}, "
                         f"parallel_attn_mlp={cfg.parallel_attn_mlp} (no rule for a gated MLP, its norm or a parallel "
                         "block); use gae for this model")
    if not supported(cfg):
        raise UserError("transformer_attribution supports pre-norm class-token models (no distillation token), "
                         f"got block_type={cfg.block_type!r}, global_pool={cfg.global_pool!r}, "
                         f"distilled={cfg.distilled}; use gae for this model")


def _readout_act(cfg: HookedViTConfig) -> str:
    """The head's input per token: the final norm's output (or the last residual stream)."""
    return "ln_final.hook_normalized" if cfg.final_norm == "token" else f"blocks.{cfg.n_layers - 1}.hook_resid_post"


def act_names(cfg: HookedViTConfig, **_: object) -> list[str]:
    """The hook points the relevance propagation reads."""
    check_supported(cfg)
    return [f"blocks.{l}.{name}" for l in range(cfg.n_layers) for name in _BLOCK_ACTS] + [_readout_act(cfg)]


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
    """LRP alpha-beta with alpha=1, beta=0 (z+) of a linear layer, bias left out."""
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


def branch(x: Float[Tensor, "b p d"], *rs: Tensor) -> Tensor:
    """Relevance of x used several times (x -> (x, x)): x * sum_i R_i / x (the authors' `Clone`)."""
    x = x.detach().double()
    return x * sum(safe_divide(r, x) for r in rs)


# ----------------------------------------------------------------------------- the model
def _scaled(linear: torch.nn.Linear, gamma) -> Tensor:
    """The weight of x -> linear(x) * gamma (LayerScale folded in)."""
    return linear.weight if gamma is None else linear.weight * gamma[:, None]


def _mlp(trace: AttentionTrace, l: int, r: Tensor) -> Tensor:
    """Relevance of ln2's input from that of the MLP output (activation and ln2: pass-through)."""
    block, acts, p = trace.model.blocks[l], trace.acts, f"blocks.{l}."
    r = linear_zplus(acts[p + "mlp.hook_post"], _scaled(block.mlp.fc2, block.mlp.ls_gamma), r)
    return linear_zplus(acts[p + "ln2.hook_normalized"], block.mlp.fc1.weight, r)


def _attention(trace: AttentionTrace, l: int, r: Tensor) -> tuple[Tensor, Tensor]:
    """(relevance of ln1's input, relevance of the attention pattern [b, h, q, k])."""
    block, acts, p = trace.model.blocks[l], trace.acts, f"blocks.{l}."
    b, n, h, e = acts[p + "attn.hook_z"].shape
    r_z = linear_zplus(acts[p + "attn.hook_z"].reshape(b, n, h * e), _scaled(block.attn.proj, block.attn.ls_gamma), r)
    heads = lambda t: t.transpose(1, 2)  # [b, p, h, e] -> [b, h, p, e]
    q, k, v = (heads(acts[p + f"attn.hook_{name}"]) for name in "qkv")
    r_a, r_v = (t / 2 for t in grad_x_input(torch.matmul, (trace.patterns[l], v), heads(r_z.reshape(b, n, h, e))))
    # softmax: pass-through; the scores' relevance goes to the unscaled product q k^T
    r_q, r_k = (t / 2 for t in grad_x_input(lambda a, c: a @ c.transpose(-1, -2), (q, k), r_a))
    r_qkv = torch.stack([heads(t) for t in (r_q, r_k, r_v)], 2).reshape(b, n, 3 * h * e)  # qkv's layout
    return linear_zplus(acts[p + "ln1.hook_normalized"], block.attn.qkv.weight, r_qkv), r_a


def _readout_relevance(trace: AttentionTrace) -> Float[Tensor, "b p d"]:
    """Relevance of the last block's output: one-hot target -> head -> class token (final norm: pass-through)."""
    model = trace.model
    model.require_head()
    x = trace.acts[_readout_act(model.cfg)].detach().double()  # [b, p, d]
    onehot = torch.nn.functional.one_hot(trace.targets, model.cfg.n_classes).double()
    r = linear_zplus(x[:, 0], model.W_U.T, onehot)  # CLIP: projection and text head folded
    out = torch.zeros_like(x)
    out[:, 0] = x[:, 0] * safe_divide(r, x[:, 0])  # the class-token selection: gradient x input
    return out


def attention_relevances(trace: AttentionTrace) -> list[Float[Tensor, "b h p p"]]:
    """Rbar_l for every block: the LRP relevance of each attention pattern."""
    check_supported(trace.model.cfg)
    r, out = _readout_relevance(trace), []
    for l in reversed(range(trace.model.cfg.n_layers)):
        acts, p = trace.acts, f"blocks.{l}."
        r_skip, r_mlp = residual_add(acts[p + "hook_resid_mid"], acts[p + "hook_mlp_out"], r)
        r = branch(acts[p + "hook_resid_mid"], r_skip, _mlp(trace, l, r_mlp))
        r_skip, r_attn = residual_add(acts[p + "hook_resid_pre"], acts[p + "hook_attn_out"], r)
        r_in, r_a = _attention(trace, l, r_attn)
        r = branch(acts[p + "hook_resid_pre"], r_skip, r_in)
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
