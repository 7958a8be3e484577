"""TransformerLens compatibility: ActivationCache decompositions and weight processing."""

from __future__ import annotations

import pytest
import torch

from helpers import images, make_timm
from hooked_vit import HookedViT

PRE_NORM_FAMILIES = ["vit_tiny_patch16_224", "vit_base_patch16_224_miil", "deit_tiny_distilled_patch16_224",
                     "vit_small_patch14_reg4_dinov2", "deit3_small_patch16_224", "vit_base_patch16_reg4_gap_256"]


def load(name, **kw):
    timm_model, size = make_timm(name)
    return HookedViT.from_timm(timm_model, **kw), images(size), timm_model


@pytest.mark.parametrize("name", PRE_NORM_FAMILIES + ["vit_base_patch16_rpn_224"])
def test_decompose_resid_sums_to_final_residual(name):
    model, x, _ = load(name)
    _, cache = model.run_with_cache(x)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * model.cfg.n_layers
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(parts.sum(0), final, rtol=1e-5, atol=1e-5)


def test_decompose_resid_with_ln_pre_uses_resid_pre():
    """CLIP towers normalise the embedding (ln_pre): embed + pos_embed is not the stream start."""
    model, x, _ = load("vit_base_patch16_clip_224")
    _, cache = model.run_with_cache(x)
    parts = cache.decompose_resid(incl_embeds=False)
    total = parts.sum(0) + cache["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(total, cache["blocks.1.hook_resid_post"], rtol=1e-5, atol=1e-5)


def test_accumulated_resid_and_head_results():
    model, x, _ = load("vit_small_patch14_reg4_dinov2")  # LayerScale: W_O must include gamma
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(x)
    acc = cache.accumulated_resid()
    assert acc.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(acc[-1], cache["blocks.1.hook_resid_post"])
    heads = cache.stack_head_results(layer=1)  # heads of layer 0
    torch.testing.assert_close(heads.sum(0) + model.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"],
                               rtol=1e-5, atol=1e-5)
    heads, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[-1] == "remainder" and len(labels) == 2 * model.cfg.n_heads + 1
    torch.testing.assert_close(heads.sum(0), cache["blocks.1.hook_resid_post"], rtol=1e-5, atol=1e-5)


def test_compute_head_results_from_z_matches_hooked_results():
    model, x, _ = load("deit3_small_patch16_224")
    _, cache = model.run_with_cache(x)  # no hook_result cached
    model.set_use_attn_result(True)
    _, ref = model.run_with_cache(x)
    cache.compute_head_results()
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], ref["blocks.1.attn.hook_result"],
                               rtol=1e-5, atol=1e-5)


TOKEN_NORM_FAMILIES = [n for n in PRE_NORM_FAMILIES if "gap" not in n]  # final norm on every token


@pytest.mark.parametrize("name", TOKEN_NORM_FAMILIES)
def test_apply_ln_to_stack_recovers_final_norm(name):
    model, x, _ = load(name)
    _, cache = model.run_with_cache(x)
    parts = cache.decompose_resid()
    normed = cache.apply_ln_to_stack(parts).sum(0)
    ln = model.ln_final
    expected = (cache["ln_final.hook_normalized"] - ln.bias) / ln.weight
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-4)


# Distilled logits read two tokens, so a single-token attribution does not sum to them.
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224_miil", "deit3_small_patch16_224"])
def test_class_logit_attribution_sums_to_logit(name):
    model, x, _ = load(name, fold_ln=True, center_writing_weights=True, fold_layer_scale=True)
    logits, cache = model.run_with_cache(x)
    classes = torch.tensor([3, 7])
    parts = cache.decompose_resid(pos_slice=0)  # [components, batch, d]: the class token
    attrs = cache.logit_attrs(parts, tokens=classes, pos_slice=0)
    recon = attrs.sum(0) + model.b_U[classes]
    torch.testing.assert_close(recon, logits[torch.arange(2), classes], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PRE_NORM_FAMILIES + ["vit_base_patch16_clip_224"])
def test_weight_processing_leaves_logits_unchanged(name):
    model, x, timm_model = load(name)
    processed, _, _ = load(name, fold_ln=True, center_writing_weights=True, fold_layer_scale=True)
    assert processed.cfg.normalization_type == "LNPre"
    assert processed.blocks[0].ln1.weight is None
    torch.testing.assert_close(processed(x), timm_model(x), rtol=1e-4, atol=1e-4)
    # Centred writing weights: every component written to the stream has zero mean.
    assert processed.W_O.mean(-1).abs().max() < 1e-6
    assert processed.W_out.mean(-1).abs().max() < 1e-6


def test_weight_processing_refuses_post_norm():
    model, _, _ = load("vit_base_patch16_rpn_224")
    with pytest.raises(ValueError, match="post-norm"):
        model.process_weights_()
