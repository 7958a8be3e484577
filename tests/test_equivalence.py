"""HookedViT reproduces timm for every supported family, with all parameters randomised."""

from __future__ import annotations

import pytest
import torch

from helpers import images, make_timm, rel_err
from hooked_vit import HookedViT

RTOL = 1e-5


def timm_block_outputs(timm_model, x):
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in timm_model.blocks]
    with torch.no_grad():
        logits = timm_model(x)
    for h in handles:
        h.remove()
    return logits, outs


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_logits_and_blocks_match_timm(family, explicit):
    timm_model, size = make_timm(family)
    model = HookedViT.from_timm(timm_model)
    x = images(size)
    ref_logits, ref_blocks = timm_block_outputs(timm_model, x)
    # Caching the pattern forces the explicit attention path; caching resid_post alone keeps SDPA.
    names = lambda n: n.endswith("resid_post") or (explicit and n.endswith("hook_pattern"))
    with torch.no_grad():
        logits, cache = model.run_with_cache(x, names_filter=names)
    assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
    assert rel_err(logits, ref_logits) < RTOL
    for layer, ref in enumerate(ref_blocks):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], ref) < RTOL, f"block {layer}"


def test_randomisation_reaches_norm_parameters(family):
    """Guard for the test above: LayerNorm weights are not left at timm's init of ones."""
    timm_model, _ = make_timm(family)
    norms = [p for n, p in timm_model.named_parameters() if "norm" in n and n.endswith("weight")]
    assert norms and all((p != 1).any() for p in norms)


def test_dynamic_image_size_matches_timm():
    timm_model, _ = make_timm("vit_tiny_patch16_224", dynamic_img_size=True)
    model = HookedViT.from_timm(timm_model)
    x = images(64)  # the model was built for 48 px: positions are resampled
    with torch.no_grad():
        assert rel_err(model(x), timm_model(x)) < RTOL


def test_distilled_head_is_average_of_both_heads():
    timm_model, size = make_timm("deit_tiny_distilled_patch16_224")
    model = HookedViT.from_timm(timm_model)
    with torch.no_grad():
        _, cache = model.run_with_cache(images(size), names_filter="hook_pooled")
        pooled = cache["hook_pooled"]
        assert pooled.shape[1:] == (2, model.cfg.d_model)
        manual = (timm_model.head(pooled[:, 0]) + timm_model.head_dist(pooled[:, 1])) / 2
        assert rel_err(model.unembed(pooled), manual) < RTOL


@pytest.mark.parametrize("flags", [("use_split_qkv_input", "use_hook_mlp_in", "use_attn_result"),
                                   ("use_attn_in", "use_hook_mlp_in")])
def test_optional_hook_flags_keep_timm_outputs(family, flags):
    """TransformerLens's optional hook points (per-head inputs, MLP input) change no output."""
    timm_model, size = make_timm(family)
    model = HookedViT.from_timm(timm_model)
    for f in flags:
        setattr(model.cfg, f, True)
    x = images(size)
    ref_logits, ref_blocks = timm_block_outputs(timm_model, x)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("resid_post", "_input", "attn_in")))
    assert any(n.endswith(("hook_q_input", "hook_attn_in")) for n in cache.keys())
    assert rel_err(logits, ref_logits) < RTOL
    for layer, ref in enumerate(ref_blocks):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], ref) < RTOL, f"block {layer}"
