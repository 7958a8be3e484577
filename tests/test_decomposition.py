"""Exact component decomposition: sums, token/head/layer consistency, ablation, every family.

Models are the small randomised timm models of tests/helpers.py (all parameters random, LayerNorm
weights and biases included), so a wrong norm statistic or a dropped bias shows up.
"""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.decomposition.decompose import (
    decompose, head_token_terms, pool_weights, readout_logits, split_biases, token_terms,
)
from circuits.decomposition.spurious import mean_ablate
from helpers import FAMILIES, images, make_timm
from hooked_vit import HookedViT

TOL = 1e-5  # relative, fp32
_MODELS: dict = {}


def model_for(name: str):
    """(timm model, HookedViT, images [3, ...]) built once per family for the module."""
    if name not in _MODELS:
        timm_model, size = make_timm(name)
        _MODELS[name] = (timm_model, HookedViT.from_timm(timm_model), images(size, 3))
    return _MODELS[name]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_components_sum_to_representation_and_logits(name):
    timm_model, model, x = model_for(name)
    dec = decompose(model, x)
    assert rel(dec.total(), dec.representation) < TOL
    logit_terms, comps = dec.logit_terms(model)
    assert comps[-1].kind == "b_U" and logit_terms.shape[1] == len(comps)
    assert rel(logit_terms.sum(1), dec.logits) < TOL
    with torch.no_grad():
        assert torch.allclose(dec.logits, timm_model(x), atol=1e-4, rtol=1e-4)
    # From a later start layer everything before is one "resid_in" term; still exact.
    late = decompose(model, x, start_layer=1)
    assert late.components[0].kind == "resid_in" and rel(late.total(), late.representation) < TOL
    assert {c.layer for c in late.components if c.layer is not None} == set(range(1, model.cfg.n_layers))
    # The reference convention: biases spread evenly; the sum is unchanged.
    split = split_biases(dec)
    assert not any(c.is_bias for c in split.components)
    assert rel(split.total(), dec.representation) < TOL
    assert rel(split.logit_terms(model)[0].sum(1), dec.logits) < TOL


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tokens_sum_to_heads_and_heads_to_sublayers(name):
    _, model, x = model_for(name)
    dec = decompose(model, x)
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("hook_attn_out", "hook_mlp_out")))
    grouped, keys = dec.sublayer_terms()
    for layer in range(model.cfg.n_layers):
        # Heads (+ b_O, + post-norm ln1 bias) = the read-out of the whole attention output.
        attn = grouped[:, keys.index(f"L{layer}.attn")]
        expected = dec.readout.stream(cache[f"blocks.{layer}.hook_attn_out"])
        assert rel(attn, expected) < TOL
        mlp = grouped[:, keys.index(f"L{layer}.mlp")]
        assert rel(mlp, dec.readout.stream(cache[f"blocks.{layer}.hook_mlp_out"])) < TOL
    # Source-token terms add up to their head's term: an identity, checked in float64 (in float32
    # the sum over 197 tokens in another order than the head's own product rounds to ~1e-5).
    model64, x64 = copy.deepcopy(model).double(), x.double()
    dec64 = decompose(model64, x64)
    for chunk in token_terms(model64, x64, dec64, heads_per_chunk=3):
        idx = [dec64.index("head", chunk.layer)[h] for h in chunk.heads]
        heads = dec64.terms[:, idx].transpose(1, 2)  # [b, r, h, d]
        assert chunk.terms.shape[2] <= 3
        assert rel(chunk.terms.sum(3), heads) < 1e-10


def test_reference_linearisation_misses_what_ours_meets():
    """The reference code's unbiased variance and fixed eps are off by ~1/(2 d_model):
    the 1e-5 check above is strict enough to catch that."""
    _, model, x = model_for("vit_tiny_patch16_224")
    _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
    resid = cache["blocks.1.hook_resid_post"][:, 0]  # class token, last block
    ln = model.ln_final
    ref = (resid - resid.mean(-1, keepdim=True)) / (resid.var(-1, unbiased=True, keepdim=True) + 1e-5).sqrt()
    ref = ref * ln.weight + ln.bias
    dec = decompose(model, x)
    assert rel(ref, dec.representation[:, 0]) > 1e-3
    assert rel(dec.total()[:, 0], dec.representation[:, 0]) < TOL


def test_mean_ablating_every_component_gives_a_constant_output():
    _, model, x = model_for("vit_base_patch16_rpn_224")  # post-norm GAP: the hardest readout
    dec = decompose(model, torch.cat([x, images(x.shape[-1], 3, seed=7)]))
    means = dec.terms[:3].mean(0)  # a "reference set" of 3 images
    rep = mean_ablate(dec.terms, range(len(dec.components)), means)
    assert torch.allclose(rep, rep[:1].expand_as(rep), atol=1e-6)
    logits = readout_logits(model, rep) + model.b_U
    assert torch.allclose(logits, logits[:1].expand_as(logits), atol=1e-5)
    # Ablating nothing leaves the representation as it is.
    assert rel(mean_ablate(dec.terms, [], means), dec.representation) < TOL


def test_head_chunks_and_materialised_terms_agree():
    _, model, x = model_for("deit_tiny_distilled_patch16_224")  # two read-out tokens
    dec = decompose(model, x)
    full = head_token_terms(model, x, dec, layer=1)  # [b, h, r, k, d]
    assert full.shape == (3, model.cfg.n_heads, 2, model.cfg.n_ctx, model.cfg.d_model)
    chunks = list(token_terms(model, x, dec, layers=[1], heads_per_chunk=1))
    assert [c.heads for c in chunks] == [[h] for h in range(model.cfg.n_heads)]
    assert torch.allclose(torch.cat([c.terms for c in chunks], 2).transpose(1, 2), full, atol=1e-6)


def test_decomposition_follows_interventions():
    """Under a hook that zeroes head 1 of layer 0, that head's term vanishes and the sum
    still equals the (changed) representation."""
    _, model, x = model_for("vit_small_patch14_reg4_dinov2")

    def kill(z, hook):
        z[:, :, 1] = 0
        return z

    dec = decompose(model, x, fwd_hooks=[("blocks.0.attn.hook_z", kill)])
    assert dec.terms[:, dec.components.index(next(c for c in dec.components if c.name == "L0H1"))].abs().max() == 0
    assert rel(dec.total(), dec.representation) < TOL
    plain = decompose(model, x)
    assert rel(plain.representation, dec.representation) > 1e-3


def test_unsupported_pooling_is_refused():
    timm_model, size = make_timm("vit_tiny_patch16_224", global_pool="max")
    model = HookedViT.from_timm(timm_model)
    with pytest.raises(NotImplementedError, match="max"):
        decompose(model, images(size, 2))
    assert pool_weights(model_for("vit_base_patch16_reg4_gap_256")[1], 13).sum().item() == pytest.approx(1.0)


@pytest.mark.gpu
def test_decomposition_on_gpu_matches_cpu():
    _, model, x = model_for("deit3_small_patch16_224")
    cpu = decompose(model, x)
    gpu_model = HookedViT.from_timm(make_timm("deit3_small_patch16_224")[0], device="cuda")
    gpu = decompose(gpu_model, x.cuda())
    assert rel(gpu.total(), gpu.representation) < TOL
    assert torch.allclose(gpu.terms.cpu(), cpu.terms, atol=1e-4)


def test_processed_weights_decompose_exactly():
    """After fold_ln / centre_writing_weights the final norm has no affine part (LNPre)."""
    timm_model, size = make_timm("vit_base_patch16_reg4_gap_256")
    model = HookedViT.from_timm(timm_model, fold_ln=True, center_writing_weights=True)
    assert model.ln_final.weight is None
    dec = decompose(model, images(size, 2))
    assert not any(c.kind == "ln_final.b" for c in dec.components)
    assert rel(dec.total(), dec.representation) < TOL
    assert rel(dec.logit_terms(model)[0].sum(1), dec.logits) < TOL


@pytest.mark.parametrize("options", [dict(attn_pool_mlp=False, attn_pool_q_proj=False),  # AIMv2's head
                                     dict(attn_pool_residual=True, attn_pool_proj=False)])
def test_map_head_variants_decompose_exactly(options):
    """AIMv2's pooling head (no MLP, no query projection) and a residual latent without
    output projection: the components still sum to the pooled vector."""
    from helpers import randomize_

    from hooked_vit import HookedViT, HookedViTConfig

    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=5, img_size=16, patch_size=8,
                          class_token=False, global_pool="map", **options)
    model = randomize_(HookedViT(cfg).eval(), 3)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    dec = decompose(model, images)
    assert ("attn_pool.mlp" in [c.kind for c in dec.components]) == cfg.attn_pool_mlp
    torch.testing.assert_close(dec.terms.sum(1), dec.representation, rtol=1e-5, atol=1e-5)


def test_attentive_probe_with_blocks_is_refused():
    from hooked_vit import HookedViT, HookedViTConfig
    from hooked_vit.errors import UnsupportedModelError

    cfg = HookedViTConfig(d_model=32, n_layers=1, n_heads=4, d_mlp=64, n_classes=5, img_size=16, patch_size=8,
                          class_token=False, global_pool="map", attn_pool_layers=1)
    with pytest.raises(UnsupportedModelError, match="attn_pool_layers"):
        decompose(HookedViT(cfg).eval(), torch.randn(1, 3, 16, 16))
