"""The rest of timm's ViT families (issue 24): relative position bias (VisionTransformerRelPos:
RelPosMlp's log-spaced MLP and RelPosBias's table, with and without a class token, pre- and
post-norm), parallel blocks (ParallelScalingBlock, fused and separate output projections),
grouped-query attention (Sapiens2) and hybrid CNN stems (HybridEmbed).

Each: every parameter randomised, logits within 1e-5 relative of timm on both attention paths,
the family's own hook points live (an edit flows to the output, backward hooks fire), and the
decomposition exact where it applies.
"""

from __future__ import annotations

import functools

import pytest
import torch
from timm.models.vision_transformer import ParallelScalingBlock

from circuits.decomposition.decompose import decompose
from helpers import rel_err, timm_pair
from hooked_vit import HookedViT
from hooked_vit.errors import UserError

RTOL = 1e-5
SMALL = dict(depth=2, embed_dim=64, num_heads=4, num_classes=10)

# name -> (timm name, extra create_model options, the family's own hook points)
FAMILIES = {
    "relpos_mlp": ("vit_relpos_small_patch16_224", dict(img_size=(64, 48)), ["blocks.1.attn.hook_rel_pos_bias"]),
    "relpos_mlp_cls": ("vit_relpos_medium_patch16_cls_224", dict(img_size=(64, 48)),
                       ["blocks.0.attn.hook_rel_pos_bias"]),
    "relpos_table_cls": ("vit_relpos_base_patch16_cls_224", dict(img_size=(64, 48), rel_pos_type="bias"),
                         ["blocks.0.attn.hook_rel_pos_bias"]),
    "relpos_table_gap": ("vit_relpos_small_patch16_224", dict(img_size=(64, 48), rel_pos_type="bias"),
                         ["blocks.0.attn.hook_rel_pos_bias"]),
    "relpos_shared": ("vit_srelpos_small_patch16_224", dict(img_size=(64, 48)), ["blocks.1.attn.hook_rel_pos_bias"]),
    "relpos_post_norm": ("vit_relpos_small_patch16_rpn_224", dict(img_size=(64, 48)),
                         ["blocks.0.attn.hook_rel_pos_bias"]),
    "parallel": ("vit_base_patch16_xp_224", dict(img_size=(64, 48)), ["blocks.0.hook_mlp_out"]),
    "parallel_fused_out": ("vit_pwee_patch16_reg1_gap_256", dict(
        img_size=(64, 48), qkv_bias=False, block_fn=functools.partial(ParallelScalingBlock, fuse_out_proj=True)),
        ["blocks.1.hook_attn_out"]),
    "parallel_things": ("vit_small_patch16_18x2_224", dict(img_size=(64, 48)), ["blocks.1.attn.hook_z"]),
    "gqa": ("vit_base_patch16_sapiens2", dict(img_size=(64, 48), num_kv_heads=2), ["blocks.0.attn.hook_v"]),
    "hybrid": ("vit_tiny_r_s16_p8_224", dict(img_size=(256, 128)), ["embed.hook_backbone_out"]),
}
_BUILT: dict = {}


def built(name: str):
    """(timm model, HookedViT, images) for a family, built once per module."""
    if name not in _BUILT:
        arch, extra, _ = FAMILIES[name]
        _BUILT[name] = timm_pair(arch, {**SMALL, **extra}, extra["img_size"])
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_matches_timm_on_both_attention_paths(name):
    timm_model, model, x = built(name)
    with torch.no_grad():
        ref = timm_model(x)
        fused = model(x)
        with model.hooks([("blocks.0.attn.hook_pattern", lambda t, hook: t)]):  # the explicit path
            explicit = model(x)
    assert rel_err(fused, ref) < RTOL and rel_err(explicit, ref) < RTOL


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_hooks_are_live(name):
    """An edit at the family's own hook point changes the output; a backward hook there fires."""
    _, model, x = built(name)
    for hook_name in FAMILIES[name][2]:
        assert hook_name in model.hook_dict, hook_name
        with torch.no_grad():
            clean = model(x)
            edited = model.run_with_hooks(x, fwd_hooks=[(hook_name, lambda t, hook: 1.5 * t)])
        assert (edited - clean).abs().max() > 1e-3, hook_name
        grads = []
        model.zero_grad()
        with model.hooks(bwd_hooks=[(hook_name, lambda g, hook: grads.append(g.shape))]):
            model(x).sum().backward()
        assert grads, hook_name


def test_rel_pos_bias_hook_is_what_timm_adds():
    for name in ("relpos_mlp", "relpos_mlp_cls", "relpos_table_cls", "relpos_table_gap", "relpos_shared"):
        timm_model, model, x = built(name)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_rel_pos_bias"))
        for layer, block in enumerate(timm_model.blocks):
            rel_pos = block.attn.rel_pos or timm_model.shared_rel_pos  # shared: one module, a copy per block
            ref = rel_pos.get_bias()  # [1, h, q, k]
            assert torch.allclose(cache[f"blocks.{layer}.attn.hook_rel_pos_bias"], ref, atol=1e-6), (name, layer)
        n_prefix = model.cfg.n_prefix_tokens
        if name == "relpos_mlp_cls":  # the MLP bias leaves class-token pairs at 0
            bias = cache["blocks.0.attn.hook_rel_pos_bias"]
            assert n_prefix == 1 and bias[..., 0, :].abs().max() == 0 and bias[..., :, 0].abs().max() == 0


def test_parallel_block_has_no_resid_mid_and_adds_both_sublayers():
    for name in ("parallel", "parallel_fused_out"):
        _, model, x = built(name)
        assert model.cfg.parallel_attn_mlp
        assert "blocks.0.hook_resid_mid" not in model.hook_dict
        _, cache = model.run_with_cache(x)
        for layer in range(model.cfg.n_layers):
            p = f"blocks.{layer}."
            total = cache[p + "hook_resid_pre"] + cache[p + "hook_attn_out"] + cache[p + "hook_mlp_out"]
            assert torch.allclose(total, cache[p + "hook_resid_post"], atol=1e-5)
            # Both sublayers read the same normalised resid_pre (ln2 is a copy of the one norm).
            assert torch.allclose(cache[p + "ln1.hook_normalized"], cache[p + "ln2.hook_normalized"])


def test_grouped_query_heads_share_keys_and_values_within_a_group():
    timm_model, model, x = built("gqa")
    groups = timm_model.blocks[0].attn.num_kv_groups
    assert groups == 2 and model.cfg.n_heads == 4
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("attn.hook_k", "attn.hook_v")))
    for hook in ("k", "v"):
        t = cache[f"blocks.0.attn.hook_{hook}"]  # [b, p, h, d_head]: query head h reads kv head h // groups
        assert torch.equal(t[:, :, 0], t[:, :, 1]) and torch.equal(t[:, :, 2], t[:, :, 3])
        assert not torch.equal(t[:, :, 1], t[:, :, 2])


def test_hybrid_stem_runs_timm_backbone_and_needs_it():
    timm_model, model, x = built("hybrid")
    assert model.embed.backbone is not timm_model.patch_embed.backbone  # a copy the model owns
    _, cache = model.run_with_cache(x, names_filter="embed.hook_backbone_out")
    with torch.no_grad():
        ref = timm_model.patch_embed.backbone(x)
    assert torch.equal(cache["embed.hook_backbone_out"], ref)
    assert model.cfg.grid_size == tuple(s // p for s, p in zip(x.shape[-2:], model.cfg.patch_size))
    with pytest.raises(UserError, match="backbone"):
        HookedViT(model.cfg)


@pytest.mark.parametrize("name", ["relpos_mlp_cls", "relpos_table_gap", "relpos_post_norm", "parallel_fused_out"])
def test_decomposition_stays_exact(name):
    """Components sum to the representation and the logits (relative position bias, parallel blocks)."""
    _, model, x = built(name)
    dec = decompose(model, x)
    assert float((dec.total() - dec.representation).norm() / dec.representation.norm()) < RTOL
    logit_terms, _ = dec.logit_terms(model)
    assert float((logit_terms.sum(1) - dec.logits).norm() / dec.logits.norm()) < RTOL
    # Each layer's attention and MLP groups are the read-out of that sublayer's output.
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("hook_attn_out", "hook_mlp_out")))
    grouped, keys = dec.sublayer_terms()
    for layer in range(model.cfg.n_layers):
        for sub in ("attn", "mlp"):
            expected = dec.readout.stream(cache[f"blocks.{layer}.hook_{sub}_out"]).detach()
            got = grouped[:, keys.index(f"L{layer}.{sub}")]
            assert float((got - expected).norm() / expected.norm()) < RTOL, (name, layer, sub)


def removal_matches_masking(model, x, drop: int) -> float:
    """Token removal (keep_mask without token `drop`) against the full sequence with that token
    hidden from attention (a key mask): every kept token's stream must agree, which holds when
    each kept pair keeps its own relative position bias."""
    keep = torch.ones(x.shape[0], model.cfg.n_ctx, dtype=torch.bool)
    keep[:, drop] = False
    with torch.no_grad():
        removed = model(x, keep_mask=keep, return_type="resid")
        masked = model(model.embed_images(x), start_at_layer=0, key_mask=keep, return_type="resid")
    return rel_err(removed, masked[:, keep[0]])


@pytest.mark.parametrize("name", ["relpos_mlp", "relpos_mlp_cls", "relpos_table_cls", "relpos_post_norm"])
def test_token_removal_keeps_each_pairs_relative_position_bias(name):
    _, model, x = built(name)
    assert removal_matches_masking(model, x, drop=model.cfg.n_prefix_tokens + 4) < RTOL
    # The bias hook then holds the kept pairs' entries: [b, h, p, p].
    keep = torch.ones(2, model.cfg.n_ctx, dtype=torch.bool)
    keep[:, -1] = False
    _, cache = model.run_with_cache(x, keep_mask=keep, names_filter="blocks.0.attn.hook_rel_pos_bias")
    full = model.blocks[0].attn._full_rel_pos_bias()
    assert torch.equal(cache["blocks.0.attn.hook_rel_pos_bias"], full[:, :, :-1, :-1].expand(2, -1, -1, -1))


def test_parallel_models_refuse_resid_mid_by_name():
    from circuits.patching import patch_activations

    _, model, x = built("parallel_fused_out")
    with pytest.raises(KeyError, match="parallel"):
        patch_activations(model, x, x.flip(0), "resid_mid", layers=[1], clean_targets=torch.tensor([1, 2]),
                          corrupted_targets=torch.tensor([2, 1]))


@pytest.mark.parametrize("name", ["parallel_fused_out", "relpos_mlp_cls", "hybrid", "gqa"])
def test_explanation_maps_run_or_refuse_in_one_line(name):
    """Every explanation method gives a finite token map, or refuses naming what is missing."""
    from circuits.explain.methods import METHODS, explain
    from hooked_vit.errors import UnknownHookError

    _, model, x = built(name)
    ran = []
    for method in sorted(METHODS):
        try:
            relevance = explain(method, model, x)
        except (UserError, UnknownHookError) as err:
            assert "resid_mid" in str(err) or "use gae" in str(err), (method, err)
            continue
        assert relevance.shape == (2, model.cfg.n_patches) and torch.isfinite(relevance).all(), method
        ran.append(method)
    assert {"attention", "rollout", "gae", "gradcam"} <= set(ran)
    if name in ("relpos_mlp_cls", "hybrid"):  # class-token pre-norm models with plain MLPs: every method
        assert set(ran) == set(METHODS)


def test_parallel_branches_are_one_block_with_every_branchs_heads_and_units():
    """ParallelThingsBlock: attn_out is the sum of timm's attention branches (branch j's heads
    at [j * h, (j + 1) * h)), mlp_out the sum of its MLP branches."""
    timm_model, model, x = built("parallel_things")
    block = timm_model.blocks[0]
    assert model.cfg.n_heads == sum(b.attn.num_heads for b in block.attns)
    _, cache = model.run_with_cache(x)
    with torch.no_grad():
        resid = cache["blocks.0.hook_resid_pre"]
        attn_out = sum(branch(resid) for branch in block.attns)
        mid = resid + attn_out
        mlp_out = sum(branch(mid) for branch in block.ffns)
        # branch 1's heads: its own pattern, from its own (affine) norm
        a1 = block.attns[1]
        h = a1.attn.num_heads
        q, k, _ = a1.attn.qkv(a1.norm(resid)).view(*resid.shape[:2], 3, h, -1).unbind(2)
        pattern = ((q.transpose(1, 2) * a1.attn.scale) @ k.permute(0, 2, 3, 1)).softmax(-1)
    assert rel_err(cache["blocks.0.hook_attn_out"], attn_out) < RTOL
    assert rel_err(cache["blocks.0.hook_mlp_out"], mlp_out) < RTOL
    assert rel_err(cache["blocks.0.attn.hook_pattern"][:, h:], pattern) < RTOL
