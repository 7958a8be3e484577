"""vit-decompose's conventions as options (Balasubramanian, Basu & Feizi, NeurIPS 2024):
biases placed as its code places them, against an independent computation from the cache."""

from __future__ import annotations

import pytest
import torch

from circuits.decomposition import decompose
from conftest import images, make_timm
from hooked_vit import HookedViT


def _reference_by_hand(model, x):
    """Per component at the class token: w * c / sigma + (b - w * mean(x) / sigma) / n, with
    b_O / H added to each head of its layer and b_out left in the MLP output."""
    _, cache = model.run_with_cache(x)
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, 0]
    ln = model.ln_final
    sigma = (last.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    coeff = ln.weight / sigma
    parts = [cache["blocks.0.hook_resid_pre"][:, 0]]
    for l, block in enumerate(model.blocks):
        z = cache[f"blocks.{l}.attn.hook_z"][:, 0]  # [b, h, e]
        for h in range(model.cfg.n_heads):
            parts.append(z[:, h] @ block.attn.W_O[h] + block.attn.b_O / model.cfg.n_heads)
        parts.append(cache[f"blocks.{l}.hook_mlp_out"][:, 0])
    constant = ln.bias - coeff * last.mean(-1, keepdim=True)
    return torch.stack([coeff * c + constant / len(parts) for c in parts], 1), cache["hook_pooled"]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_reference_biases_equal_the_hand_computation_and_keep_the_sum_rule(name):
    timm_model, size = make_timm(name, seed=21)
    model, x = HookedViT.from_timm(timm_model), images(size, 2)
    dec = decompose(model, x, biases="reference")
    hand, pooled = _reference_by_hand(model, x)
    assert [c.kind for c in dec.components].count("b_O") == 0 and "ln_final.b" not in dec.names
    torch.testing.assert_close(dec.terms[:, :, 0], hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dec.total()[:, 0], pooled, rtol=1e-4, atol=1e-5)
    logits, _ = dec.logit_terms(model)
    torch.testing.assert_close(logits.sum(1), model(x), rtol=1e-4, atol=1e-4)
    # not the even split of the total bias
    assert not torch.allclose(dec.terms, decompose(model, x, biases="split").terms, atol=1e-3)


def test_reference_biases_refuse_post_norm_and_unknown_modes():
    timm_model, size = make_timm("vit_base_patch16_clip_224", seed=1)
    model, x = HookedViT.from_timm(timm_model), images(size, 1)
    with pytest.raises(ValueError, match="biases must be one of"):
        decompose(model, x, biases="even")
