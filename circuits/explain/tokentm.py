"""TokenTM (Wu et al., CVPR 2024): attention combined with how much each sublayer
transforms each token, aggregated over all blocks. A reconstruction (docs/explanations.md, "TokenTM"): the
paper's text was not at hand, so every uncertain choice is an option.

Token length L(e) = ||e||. For a sublayer that maps tokens E_i to E~_i:
    NECC_i = softmax over tokens i of cos(E_i, E~_i)
    w_i    = L(E~_i) / L(E_i) * NECC_i                 (W = diag(w))
    C_0    = diag(L(E^0_i))                            (E^0: the embedded tokens)
    U_att  = I + (mean_h A @ W_att) * G,   G = mean_h relu(d y_t / d A)   (elementwise)
    U_mlp  = I + W_mlp
    C_l    = U_mlp @ U_att @ C_{l-1};  map = C_L[CLS, image tokens]

Options (defaults first):
    attn_transform: "resid" | "value" | "output". What E and E~ are. "resid" (the default):
        each sublayer's transformation is read between the residual stream before and
        after it: attention E = block input (hook_resid_pre), E~ = hook_resid_mid; MLP
        E = hook_resid_mid, E~ = hook_resid_post. This is how the only other known
        implementation (the LibraGrad authors', CVPR 2025) reads the paper;
        it sets the MLP step too, so `inputs` must stay "resid". "value": the vector token
        j would write if attended to alone, v_j W_O + b_O (post-norm blocks: passed through
        the block's norm). A @ W then scales the contribution of source token j by how much
        attention's per-token map transforms it. "output": the sublayer output attn_out_j.
    inputs: "resid" | "normalized". What E is: the residual stream entering the sublayer,
        or the LayerNorm output that it reads (pre-norm blocks; post-norm blocks read the
        residual stream either way).
    length: bool. Include the length ratio L(E~)/L(E) in w (False: w = NECC).
    necc: "softmax" | "cosine" | "none". Softmax over tokens of the cosine, the raw cosine,
        or 1.
    grad: "relu" | "abs" | "raw" | "none". G = mean_h relu(g), mean_h |g|, mean_h g, or 1.
    init: "length" | "identity". C_0 = diag(L(E^0)) or I.
With length=False, necc="none" (W = I), grad="none" (G = 1) and init="identity",
C_L = prod_l 2 (I + mean_h A_l): the unnormalised attention product (times 2^L).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.explain.trace import AttentionTrace
from hooked_vit import HookedViTConfig
from hooked_vit.errors import UserError

AttnTransform = Literal["resid", "value", "output"]
TRANSFORMS = ("resid", "value", "output")
Inputs = Literal["resid", "normalized"]
Necc = Literal["softmax", "cosine", "none"]
GradTerm = Literal["relu", "abs", "raw", "none"]
Init = Literal["length", "identity"]


def act_names(cfg: HookedViTConfig, attn_transform: AttnTransform = "resid", inputs: Inputs = "resid",
              **_: object) -> list[str]:
    """The hook points TokenTM reads, for these options."""
    if attn_transform == "resid":
        return sorted({f"blocks.{l}.{h}" for l in range(cfg.n_layers)
                       for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")})
    normalized = inputs == "normalized" and cfg.block_type == "pre_norm"
    names = []
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        names += [p + "ln1.hook_normalized", p + "ln2.hook_normalized"] if normalized else [
            p + "hook_resid_pre", p + "hook_resid_mid"]
        names += [p + "attn.hook_v"] if attn_transform == "value" else [p + "hook_attn_out"]
        names.append(p + "hook_mlp_out")
    return sorted(set(names + ["blocks.0.hook_resid_pre"]))


def transformation_weights(
    before: Float[Tensor, "b p d"], after: Float[Tensor, "b p d"], *, length: bool = True, necc: Necc = "softmax"
) -> Float[Tensor, "b p"]:
    """w_i = L(E~_i) / L(E_i) * NECC_i (each factor optional, see the module doc)."""
    before, after = before.float(), after.float()
    w = torch.ones(before.shape[:2], device=before.device)
    necc = necc or "none"
    if length:
        w = after.norm(dim=-1) / before.norm(dim=-1).clamp(min=1e-12)
    if necc != "none":
        cos = F.cosine_similarity(before, after, dim=-1)  # 0 where a vector is zero
        if necc == "softmax":
            w = w * cos.softmax(dim=-1)
        elif necc == "cosine":
            w = w * cos
        else:
            raise UserError(f"necc must be softmax, cosine or none, got {necc!r}")
    return w


def gradient_term(grad: Float[Tensor, "b h p p"], how: GradTerm) -> Tensor:
    if how == "relu":
        return grad.float().clamp(min=0).mean(1)
    if how == "abs":
        return grad.float().abs().mean(1)
    if how == "raw":
        return grad.float().mean(1)
    raise UserError(f"grad must be relu, abs, raw or none, got {how!r}")


def _value_transform(trace: AttentionTrace, l: int) -> Float[Tensor, "b p d"]:
    """v_j W_O + b_O for every token j: what j writes when it is attended to alone."""
    block = trace.model.blocks[l]
    v = trace.acts[f"blocks.{l}.attn.hook_v"]  # [b, p, h, e]
    out = torch.einsum("bphe,hed->bpd", v, block.attn.W_O) + block.attn.b_O
    return block.ln1.functional(out) if trace.model.cfg.block_type == "post_norm" else out


def _sublayer_io(trace: AttentionTrace, l: int, sublayer: str, attn_transform: AttnTransform,
                 inputs: Inputs) -> tuple[Tensor, Tensor]:
    """(E, E~) of block l's attention or MLP sublayer for these options."""
    acts, p = trace.acts, f"blocks.{l}."
    if attn_transform == "resid":  # the stream before and after the sublayer
        names = ("hook_resid_pre", "hook_resid_mid") if sublayer == "attn" else ("hook_resid_mid", "hook_resid_post")
        return acts[p + names[0]].detach(), acts[p + names[1]].detach()
    normalized = inputs == "normalized" and trace.model.cfg.block_type == "pre_norm"
    if sublayer == "attn":
        before = acts[p + ("ln1.hook_normalized" if normalized else "hook_resid_pre")]
        after = _value_transform(trace, l) if attn_transform == "value" else acts[p + "hook_attn_out"]
    else:
        before = acts[p + ("ln2.hook_normalized" if normalized else "hook_resid_mid")]
        after = acts[p + "hook_mlp_out"]
    return before.detach(), after.detach()


def tokentm(
    trace: AttentionTrace,
    *,
    attn_transform: AttnTransform = "resid",
    inputs: Inputs = "resid",
    length: bool = True,
    necc: Necc = "softmax",
    grad: GradTerm = "relu",
    init: Init = "length",
) -> Tensor:
    """TokenTM map over image tokens (see the module doc for the options). [b, n_patches]"""
    necc, grad = necc or "none", grad or "none"  # None and "none" both mean: leave the term out
    if inputs not in ("resid", "normalized") or attn_transform not in TRANSFORMS:
        raise UserError(f"inputs must be resid|normalized and attn_transform resid|value|output, got {inputs!r}, "
                         f"{attn_transform!r}")
    if attn_transform == "resid" and inputs != "resid":
        raise UserError("attn_transform='resid' reads the residual stream on both sides of each sublayer; "
                         "inputs='normalized' needs attn_transform='value' or 'output'")
    b, p = trace.patterns[0].shape[0], trace.n_tokens
    eye = torch.eye(p, device=trace.logits.device)
    if init == "length":
        c = torch.diag_embed(trace.acts["blocks.0.hook_resid_pre"].detach().float().norm(dim=-1))
    elif init == "identity":
        c = eye.expand(b, -1, -1)
    else:
        raise UserError(f"init must be length or identity, got {init!r}")
    grads = trace.target_grads() if grad != "none" else None
    opts = dict(length=length, necc=necc)
    for l, pattern in enumerate(trace.patterns):
        w_att = transformation_weights(*_sublayer_io(trace, l, "attn", attn_transform, inputs), **opts)
        mixed = pattern.detach().float().mean(1) * w_att[:, None, :]  # mean_h A @ diag(w_att)
        if grads is not None:
            mixed = mixed * gradient_term(grads[l], grad)
        w_mlp = transformation_weights(*_sublayer_io(trace, l, "mlp", attn_transform, inputs), **opts)
        c = (1 + w_mlp)[:, :, None] * ((eye + mixed) @ c)  # U_mlp = I + diag(w_mlp)
    return trace.image_tokens(trace.read_row(c))
