"""The papers' own readings of the explanation methods, against independent computations:
TokenTM's residual reading (Wu et al., CVPR 2024, as the LibraGrad authors implement it),
Chefer, Gur & Wolf's transformer attribution (CVPR 2021), and `start_layer` for rollout
and GAE as in the authors' code."""

from __future__ import annotations

import pytest
import torch

from circuits.explain import explain
from circuits.explain.transformer_attribution import branch, grad_x_input, linear_zplus, residual_add
from helpers import images, make_timm
from hooked_vit import HookedViT
from test_explain_methods import load, patterns_and_grads


def _tokentm_by_hand(model, x, targets):
    """TokenTM with E, E~ = the residual stream before / after each sublayer, from
    run_with_cache, in float64, token by token."""
    _, cache = model.run_with_cache(x)
    pats, grads = patterns_and_grads(model, x, targets)
    out = []
    for i in range(x.shape[0]):
        e0 = cache["blocks.0.hook_resid_pre"][i].double()
        p = e0.shape[0]
        c = torch.diag(torch.stack([e0[t].norm() for t in range(p)]))
        for l in range(model.cfg.n_layers):
            def w(before, after):
                cos = torch.stack([before[t] @ after[t] / (before[t].norm() * after[t].norm()) for t in range(p)])
                necc = torch.exp(cos) / torch.exp(cos).sum()
                return torch.stack([after[t].norm() / before[t].norm() for t in range(p)]) * necc
            pre, mid, post = (cache[f"blocks.{l}.hook_resid_{s}"][i].double() for s in ("pre", "mid", "post"))
            a, g = pats[l][i].double().mean(0), grads[l][i].double().clamp(min=0).mean(0)
            u_att = torch.eye(p, dtype=torch.double) + (a @ torch.diag(w(pre, mid))) * g
            u_mlp = torch.eye(p, dtype=torch.double) + torch.diag(w(mid, post))
            c = u_mlp @ u_att @ c
        out.append(c[0, 1:])
    return torch.stack(out)


def test_tokentm_residual_reading_equals_the_formula_from_cached_residuals():
    model, x = load("vit_tiny_patch16_224", seed=11, batch=2)
    targets = torch.tensor([2, 5])
    hand = _tokentm_by_hand(model, x, targets)
    for rel in (explain("tokentm", model, x, targets), explain("tokentm", model, x, targets, attn_transform="resid")):
        torch.testing.assert_close(rel.double(), hand, rtol=1e-6, atol=1e-6 * float(hand.detach().abs().max()))
    # the other readings are not this one
    other = explain("tokentm", model, x, targets, attn_transform="value").double()
    assert not torch.allclose(other, hand, rtol=1e-3)


# ------------------------------------------------------------------ transformer attribution
def _div(a, b):
    """The authors' stabilised division: a / (b + 1e-9), 0 where b = 0."""
    return torch.where(b != 0, a / (b + 1e-9), torch.zeros_like(a * b))


def _gxi(fn, x, r):
    """Gradient x input from the full Jacobian: R_in = x * J^T (R / f(x)), 0 where f(x) = 0."""
    y = fn(x)
    s = _div(r, y)
    jac = torch.autograd.functional.jacobian(fn, x).reshape(y.numel(), x.numel())
    return x * (jac.T @ s.flatten()).reshape(x.shape)


def _zplus(x, w, r):
    """z+ from the contribution matrix z[o, i] = x_i w[o, i], positive part."""
    z = (x[..., None, :] * w).clamp(min=0)  # [..., o, i]
    return (_div(r[..., None], z.sum(-1, keepdim=True)) * z).sum(-2)


def _add(a, b, r):
    ra, rb = a * _div(r, a + b), b * _div(r, a + b)
    sa, sb = ra.sum(), rb.sum()
    fa, fb = _div(sa.abs(), sa.abs() + sb.abs()) * r.sum(), _div(sb.abs(), sa.abs() + sb.abs()) * r.sum()
    return ra * _div(fa, sa), rb * _div(fb, sb)


def _one_block_by_hand(timm_model, x, target):
    """Chefer et al.'s transformer attribution of a 1-block timm ViT, one image, written from
    the rules of the authors' code on the timm modules (no HookedViT): z+ on linear layers,
    LayerNorm / GELU / softmax passing relevance through, gradient x input at the products."""
    blk, h = timm_model.blocks[0], timm_model.blocks[0].attn.num_heads
    with torch.no_grad():
        e = timm_model._pos_embed(timm_model.patch_embed(x))[0]  # [p, d]
    n1 = blk.norm1(e).detach()
    p, d = n1.shape
    q, k, v = blk.attn.qkv(n1).detach().reshape(p, 3, h, d // h).permute(1, 2, 0, 3)  # [h, p, e] each
    scores = (q @ k.transpose(-1, -2)) * blk.attn.scale
    a = scores.softmax(-1).requires_grad_(True)

    def after_pattern(a):
        z = (a @ v).transpose(0, 1).reshape(p, d)
        mid = e + blk.attn.proj(z)
        post = mid + blk.mlp(blk.norm2(mid))
        return timm_model.head(timm_model.norm(post)[0])

    (grad,) = torch.autograd.grad(after_pattern(a)[target], a)
    with torch.no_grad():
        z = (a @ v).transpose(0, 1).reshape(p, d)
        attn_out = blk.attn.proj(z)
        mid = e + attn_out
        n2 = blk.norm2(mid)
        pre = blk.mlp.fc1(n2)
        hidden = blk.mlp.act(pre)
        mlp_out = blk.mlp.fc2(hidden)
        post = mid + mlp_out
    cls = timm_model.norm(post)[0]  # the head's input; the final norm passes relevance through
    r = _zplus(cls, timm_model.head.weight.detach(), torch.eye(timm_model.num_classes, dtype=torch.double)[target])
    r_post = torch.zeros(p, d, dtype=torch.double)
    r_post[0] = cls * _div(r, cls)  # the class-token selection
    r_skip, r_mlp = _add(mid, mlp_out, r_post)
    r_mlp = _zplus(n2, blk.mlp.fc1.weight.detach(), _zplus(hidden, blk.mlp.fc2.weight.detach(), r_mlp))  # GELU, norm2: pass
    r_mid = mid * (_div(r_skip, mid) + _div(r_mlp, mid))  # the branch point before norm2
    _, r_attn = _add(e, attn_out, r_mid)
    r_z = _zplus(z, blk.attn.proj.weight.detach(), r_attn).reshape(p, h, d // h).transpose(0, 1)
    rel_a = _gxi(lambda t: t @ v, a.detach(), r_z) / 2  # the pattern's half of the product
    cam = (grad * rel_a).clamp(min=0).mean(0)
    return (torch.eye(p, dtype=torch.double) + cam)[0, 1:]


def test_transformer_attribution_equals_the_papers_rules_on_a_one_block_model():
    for seed, target in ((12, 3), (13, 8)):
        timm_model, size = make_timm("vit_tiny_patch16_224", seed, depth=1)
        timm_model, x = timm_model.double(), images(size, 1).double()  # both in float64, as the rules run
        hand = _one_block_by_hand(timm_model, x, target)
        rel = explain("transformer_attribution", HookedViT.from_timm(timm_model), x, torch.tensor([target]))
        assert hand[1:].abs().max() > 0  # the test has something to compare
        torch.testing.assert_close(rel[0].double(), hand.detach(), rtol=1e-5, atol=1e-6 * float(hand.detach().abs().max()))


def test_lrp_rules_on_hand_computable_cases():
    t = lambda v: torch.tensor(v, dtype=torch.double)
    x, w = t([[1.0, -2.0]]), t([[3.0, 1.0], [-1.0, 2.0]])
    # z[0] = (3, -2): only +3 counts; z[1] = (-1, -4): nothing positive -> no relevance
    torch.testing.assert_close(linear_zplus(x, w, t([[0.5, 7.0]])), t([[0.5, 0.0]]))
    a, b = torch.ones(1, 1, 2, dtype=torch.double), t([[[3.0, -1.0]]])  # y = (4, 0)
    ra, rb = residual_add(a, b, t([[[2.0, 5.0]]]))  # y = 0 passes nothing down, but the total
    # sum(R) = 7 is rescaled onto the two shares |0.5| : |1.5| of what passed: 1.75 and 5.25
    torch.testing.assert_close(ra, t([[[1.75, 0.0]]]))
    torch.testing.assert_close(rb, t([[[5.25, 0.0]]]))
    (r,) = grad_x_input(lambda v: 2 * v, (t([1.0, 0.0]),), t([3.0, 4.0]))
    torch.testing.assert_close(r, t([3.0, 0.0]))
    # a branch point adds the relevances of both uses, and a zero input receives none
    torch.testing.assert_close(branch(t([2.0, 0.0]), t([1.0, 3.0]), t([0.5, 1.0])), t([1.5, 0.0]))


def test_transformer_attribution_refuses_families_outside_the_paper():
    model, x = load("vit_base_patch16_reg4_gap_256")
    with pytest.raises(ValueError, match="pre-norm class-token"):
        explain("transformer_attribution", model, x)


def test_start_layer_skips_the_earlier_blocks_in_rollout_gae_and_attribution():
    model, x = load("vit_tiny_patch16_224", seed=14)
    targets = torch.tensor([4, 6])
    pats, grads = patterns_and_grads(model, x, targets)
    eye = torch.eye(pats[0].shape[-1])
    a = pats[1].mean(1) + eye
    torch.testing.assert_close(explain("rollout", model, x, start_layer=1), (a / a.sum(-1, keepdim=True))[:, 0, 1:])
    torch.testing.assert_close(explain("rollout", model, x, start_layer=-1), explain("rollout", model, x, start_layer=1))
    gae_last = (eye + (grads[1] * pats[1]).clamp(min=0).mean(1))[:, 0, 1:]
    torch.testing.assert_close(explain("gae", model, x, targets, start_layer=1), gae_last, rtol=1e-5, atol=1e-7)
    full = explain("transformer_attribution", model, x, targets)
    assert not torch.allclose(full, explain("transformer_attribution", model, x, targets, start_layer=1), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="start_layer"):
        explain("gae", model, x, targets, start_layer=2)
