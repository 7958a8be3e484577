"""vit-decompose's conventions as options (Balasubramanian, Basu & Feizi, NeurIPS 2024):
biases placed as its code places them, against an independent computation from the cache."""

from __future__ import annotations

import pytest
import torch

from circuits.decomposition import decompose
from helpers import images, make_timm
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


# ------------------------------------------------------------------ zero-shot segmentation
def test_decomposition_segmentation_equals_token_contributions_from_the_cache():
    """map[k] = sum over chosen heads of <w * centre(A[h, CLS, k] v_k W_O[h]) / sigma, W_U[:, t]>."""
    from circuits.decomposition import class_direction, decomposition_segmentation
    from circuits.explain import segmentation_counts, upsample

    timm_model, size = make_timm("vit_small_patch14_reg4_dinov2", seed=22)
    model, x = HookedViT.from_timm(timm_model), images(size, 2)
    targets = torch.tensor([1, 4])
    dec = decompose(model, x)
    chosen = [dec.names.index("L1H2"), dec.names.index("L0H1")]
    seg = decomposition_segmentation(model, x, dec, class_direction(model, targets), chosen)

    _, cache = model.run_with_cache(x)
    last = cache["blocks.1.hook_resid_post"][:, 0]
    sigma = (last.var(-1, unbiased=False, keepdim=True) + model.ln_final.eps).sqrt()  # [b, 1]
    hand = 0
    for layer, head in ((1, 2), (0, 1)):
        a = cache[f"blocks.{layer}.attn.hook_pattern"][:, head, 0]  # [b, k]
        vo = cache[f"blocks.{layer}.attn.hook_v"][:, :, head] @ model.blocks[layer].attn.W_O[head]  # [b, k, d]
        term = a[..., None] * vo
        term = model.ln_final.weight * (term - term.mean(-1, keepdim=True)) / sigma[:, None]
        hand = hand + torch.einsum("bkd,bd->bk", term, model.head.weight[targets])
    n_prefix = model.cfg.n_prefix_tokens
    assert seg.shape == (2, model.cfg.n_patches)
    torch.testing.assert_close(seg, hand[:, n_prefix:], rtol=1e-4, atol=1e-5)
    counts = segmentation_counts(upsample(seg, size), torch.zeros(2, size, size, dtype=torch.bool))
    assert counts["labeled"].tolist() == [size * size] * 2  # the explanation metrics take it as is
    with pytest.raises(ValueError, match="only head components"):
        decomposition_segmentation(model, x, dec, class_direction(model, targets), [dec.names.index("L0.mlp")])


# ------------------------------------------------------------------ scoring conventions
def test_reference_scoring_is_gram_schmidt_in_order_and_unbiased_stds():
    import numpy as np

    from circuits.decomposition.scoring import component_scores, orthonormal_basis

    gen = torch.Generator().manual_seed(3)
    mapped = torch.randn(40, 5, 6, generator=gen, dtype=torch.double)
    directions = torch.randn(3, 6, generator=gen, dtype=torch.double)
    # Gram-Schmidt in the given order, by hand
    gs = []
    for d in directions:
        for b in gs:
            d = d - (d @ b) * b
        gs.append(d / d.norm())
    gs = torch.stack(gs)
    qr = orthonormal_basis(directions, method="qr")
    torch.testing.assert_close(qr.abs(), gs.abs())  # QR = Gram-Schmidt up to signs
    s = (mapped @ gs.T).numpy()  # [n, C, k]
    z = s.sum(1)
    hand = np.zeros(5)
    for c in range(5):
        hand[c] = np.mean([np.cov(s[:, c, k], z[:, k], ddof=0)[0, 1] / (s[:, c, k].std(ddof=1) * z[:, k].std(ddof=1))
                           for k in range(3)])
    ref = component_scores(mapped, qr, convention="reference")
    torch.testing.assert_close(ref, torch.from_numpy(hand))
    ours = component_scores(mapped, orthonormal_basis(directions))
    assert not torch.allclose(ours, ref)  # another basis and another estimator
    # covariance scores are a trace: the same in any orthonormal basis of the span
    torch.testing.assert_close(component_scores(mapped, qr, "covariance"),
                               component_scores(mapped, orthonormal_basis(directions), "covariance"))
    with pytest.raises(ValueError, match="linearly dependent"):
        orthonormal_basis(torch.cat([directions, directions[:1] * 2]), method="qr")


# ------------------------------------------------------------------ hard-orthonormal aligner
@pytest.mark.parametrize("d_out", [6, 4])
def test_hard_orthonormal_aligner_stays_orthonormal_and_fits(d_out):
    from circuits.decomposition.align import fit_alignment, orthogonality_penalty

    torch.manual_seed(0)
    n_comp, d, n = 3, 6, 256
    planted = torch.linalg.qr(torch.randn(n_comp, d, d)).Q[:, :d_out]  # isometries (narrowing for 4)
    terms = torch.randn(n, n_comp, d)
    targets = torch.einsum("nci,coi->no", terms, planted)
    result = fit_alignment(terms, targets, steps=150, lr=3e-2, progress=False, seed=1, constraint="orthogonal")
    w = result.maps.weight
    assert all(rec["penalty"] < 1e-10 for rec in result.history)  # orthonormal at every logged step
    torch.testing.assert_close(w @ w.transpose(1, 2), torch.eye(d_out).expand(n_comp, -1, -1), atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(result.maps(terms).sum(1), targets).mean()
    assert cos > 0.99 and abs(float(cos) - result.cosine) < 0.02
    assert float(orthogonality_penalty(w)) < 1e-10
    with pytest.raises(ValueError, match="constraint"):
        fit_alignment(terms, targets, steps=1, progress=False, constraint="hard")
