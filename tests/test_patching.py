"""Activation patching over layer x position (x head) for images."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp

from circuits.patching import act_patch, index_frame, patch_activations
from helpers import images, make_timm
from hooked_vit import HookedViT

FAMILIES = ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2", "deit_tiny_distilled_patch16_224"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    timm_model, size = make_timm(request.param)
    model = HookedViT.from_timm(timm_model)
    return model, images(size, 2, seed=1), images(size, 2, seed=7)


def test_patching_clean_into_clean_changes_nothing(setup):
    model, clean, _ = setup
    grids = patch_activations(model, clean, clean, ["resid_pre", "z", "pattern"],
                              positions=[0, -1], metric="target_logit")
    for grid in grids.values():
        torch.testing.assert_close(grid.values, grid.clean.expand_as(grid.values), atol=1e-5, rtol=1e-5)
    assert grids["z"].values.shape == (model.cfg.n_layers, 2, model.cfg.n_heads, 2)
    assert grids["z"].coords["pos"] == [0, model.cfg.n_ctx - 1]  # -1 is the last token, not "all"


def test_patching_every_position_recovers_the_clean_run(setup):
    model, clean, corrupted = setup
    grids = patch_activations(model, clean, corrupted, ["resid_pre", "resid_post"], positions="all",
                              metric="logit_diff")
    assert not torch.allclose(grids["resid_pre"].clean, grids["resid_pre"].corrupted)
    for grid in grids.values():  # the whole residual stream of any layer carries the clean run
        assert grid.values.shape == (model.cfg.n_layers, 1, 2)
        torch.testing.assert_close(grid.values, grid.clean.expand_as(grid.values), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grid.mean(normalize=True), torch.ones(model.cfg.n_layers, 1))
    # all heads' z at all positions of block 0 = that block's clean attention output
    z = patch_activations(model, clean, corrupted, "z", layers=[0], positions="all", heads="all",
                          metric="target_logit")
    first_block_only = patch_activations(model, clean, corrupted, "attn_out", layers=[0], positions="all",
                                         metric="target_logit")
    torch.testing.assert_close(z.values[0, 0, 0], first_block_only.values[0, 0], atol=1e-4, rtol=1e-4)


def test_one_cell_equals_a_hand_written_patch(setup):
    model, clean, corrupted = setup
    _, cache = model.run_with_cache(clean)
    targets = model(clean).argmax(-1)
    layer, pos, head = 0, model.cfg.n_prefix_tokens + 1, 2  # block 0: a patch token still feeds the readout

    def patch_z(z, hook):
        z[:, pos, head] = cache[hook.name][:, pos, head]
        return z

    def patch_pattern(p, hook):
        p[:, head, pos] = cache[hook.name][:, head, pos]
        return p

    def patch_resid(r, hook):
        r[:, pos] = cache[hook.name][:, pos]
        return r

    for site, name, fn in (("z", "attn.hook_z", patch_z), ("pattern", "attn.hook_pattern", patch_pattern),
                           ("resid_mid", "hook_resid_mid", patch_resid)):
        grid = patch_activations(model, clean, corrupted, site, layers=[layer], positions=[pos],
                                 heads=[head] if site != "resid_mid" else None, metric="target_logit",
                                 clean_targets=targets)
        hand = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.{name}", fn)])
        torch.testing.assert_close(grid.values.reshape(2), hand.gather(1, targets[:, None])[:, 0])
        assert not torch.allclose(grid.values.reshape(2), grid.corrupted)  # the patch did something
    # the per-head result needs use_attn_result; the flag is restored afterwards
    assert not model.cfg.use_attn_result
    res = patch_activations(model, clean, corrupted, "result", layers=[layer], positions=[pos], heads=[head],
                            metric="target_logit", clean_targets=targets)
    zres = patch_activations(model, clean, corrupted, "z", layers=[layer], positions=[pos], heads=[head],
                             metric="target_logit", clean_targets=targets)
    torch.testing.assert_close(res.values, zres.values, atol=1e-5, rtol=1e-5)
    assert not model.cfg.use_attn_result


def test_positions_run_over_the_sequence_not_the_image_width():
    timm_model, size = make_timm("vit_base_patch32_224")  # 64 px wide, 1 + 2x2 tokens
    model = HookedViT.from_timm(timm_model)
    clean, corrupted = images(size, 2), images(size, 2, seed=9)
    grid = patch_activations(model, clean, corrupted, "resid_pre", metric="rank")
    assert grid.values.shape == (model.cfg.n_layers, 5, 2) and grid.coords["pos"] == [0, 1, 2, 3, 4]
    frame = grid.to_frame()
    assert len(frame) == model.cfg.n_layers * 5 * 2 and set(frame.columns) >= {"layer", "pos", "image", "value"}
    assert list(index_frame(model, "z", 5, heads="all")["head"].unique()) == [-1]


def test_transformer_lens_functions_on_hooked_vit():
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model = HookedViT.from_timm(timm_model)
    clean, corrupted = images(size, 2), images(size, 2, seed=9)
    _, cache = model.run_with_cache(clean)
    metric = lambda logits: logits[:, 3].mean()  # noqa: E731
    # TL's layer x head functions run on HookedViT as-is and agree with ours.
    with torch.inference_mode():
        tl = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
        v = tlp.get_act_patch_attn_head_v_all_pos(model, corrupted, cache, metric)
    ours = patch_activations(model, clean, corrupted, "z", positions="all",
                             metric=lambda logits, c, k: logits[:, 3])
    torch.testing.assert_close(tl, ours.mean()[:, 0], atol=1e-5, rtol=1e-5)
    ours_v = patch_activations(model, clean, corrupted, "v", positions="all",
                               metric=lambda logits, c, k: logits[:, 3])
    torch.testing.assert_close(v, ours_v.mean()[:, 0], atol=1e-5, rtol=1e-5)
    # TL's own by-position sweep takes the width (48 px) as the sequence length; ours the 10 tokens.
    by_pos = act_patch(model, corrupted, cache, metric, "resid_pre")
    assert by_pos.shape == (model.cfg.n_layers * model.cfg.n_ctx,)
    direct = patch_activations(model, clean, corrupted, "resid_pre", metric=lambda logits, c, k: logits[:, 3])
    torch.testing.assert_close(by_pos.reshape(model.cfg.n_layers, -1), direct.mean(), atol=1e-5, rtol=1e-5)
