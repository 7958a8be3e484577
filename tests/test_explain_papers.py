"""The papers' own readings of the explanation methods, against independent computations:
TokenTM's residual reading (Wu et al., CVPR 2024, as the LibraGrad authors implement it),
Chefer, Gur & Wolf's transformer attribution (CVPR 2021), and `start_layer` for rollout
and GAE as in the authors' code."""

from __future__ import annotations

import torch

from circuits.explain import explain
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
        torch.testing.assert_close(rel.double(), hand, rtol=1e-6, atol=1e-6 * float(hand.abs().max()))
    # the other readings are not this one
    other = explain("tokentm", model, x, targets, attn_transform="value").double()
    assert not torch.allclose(other, hand, rtol=1e-3)
