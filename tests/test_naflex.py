"""NaFlex inputs (hooked_vit.naflex): timm NaFlexVit variants, every parameter randomised, fed
one padded batch of two aspect ratios as patches, match timm on both attention paths; each
image's row equals that image run alone; the patch mask hook is live; bad layouts are refused."""

from __future__ import annotations

import pytest
import torch

import zoo
from helpers import rel_err
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.naflex import NaFlexInputs, pad_batch, patchify

# Pooling avg / map / token, learned / factorized positions, aspect-ratio preserving, RADIO's
# 128x128 table with align_corners and no antialias.
NAMES = ["naflexvit_base_patch16_gap", "naflexvit_base_patch16_siglip", "naflexvit_base_patch16_parfac_gap",
         "naflexvit_base_patch16_radio_v3"]
EXPLICIT = [("blocks.0.attn.hook_pattern", lambda t, hook: t), ("attn_pool.hook_pattern", lambda t, hook: t)]


def two_aspect_ratios(seed: int = 2) -> tuple[list[torch.Tensor], NaFlexInputs]:
    """A 4x3-patch and a 2x5-patch image (patch 16) in one batch padded to 14 patches."""
    gen = torch.Generator().manual_seed(seed)
    imgs = [torch.randn(3, 64, 48, generator=gen), torch.randn(3, 32, 80, generator=gen)]
    return imgs, pad_batch(imgs, (16, 16), max_patches=14)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    timm_model, _ = zoo.small_variant(request.param)
    return timm_model, HookedViT.from_timm(timm_model)


def explicit_hooks(model):
    return [(n, f) for n, f in EXPLICIT if n in model.hook_dict]


def test_naflex_batch_matches_timm_both_paths(pair):
    timm_model, model = pair
    _, batch = two_aspect_ratios()
    with torch.no_grad():
        ref = timm_model(batch._asdict())
        fused = model(batch._asdict())
        by_keywords = model(batch.patches, patch_coord=batch.patch_coord, patch_valid=batch.patch_valid)
        with model.hooks(explicit_hooks(model)):
            explicit = model(batch._asdict())
    assert rel_err(fused, ref) < 1e-5 and rel_err(explicit, ref) < 1e-5
    assert torch.equal(fused, by_keywords)


def test_each_naflex_row_is_its_image_alone(pair):
    """Padding and the other image change nothing: row i equals image i run as a plain image."""
    _, model = pair
    imgs, batch = two_aspect_ratios()
    with torch.no_grad():
        rows = model(batch._asdict())
        alone = torch.cat([model(img[None]) for img in imgs])
        # the same image as patches of its own length (no padding) too
        single = model(pad_batch(imgs[1:], (16, 16))._asdict())
    assert rel_err(rows, alone) < 1e-5 and rel_err(single[0], alone[1]) < 1e-5


def test_patch_mask_hook_fires_and_edits_flow(pair):
    _, model = pair
    _, batch = two_aspect_ratios()
    n_prefix = model.cfg.n_prefix_tokens
    _, cache = model.run_with_cache(batch._asdict(), names_filter=["embed.hook_patch_mask", "blocks.0.hook_resid_pre"])
    mask = cache["embed.hook_patch_mask"]
    assert mask.shape == (2, n_prefix + 14) and mask.dtype == torch.bool
    assert mask[:, :n_prefix].all() and mask[0, n_prefix:].sum() == 12 and mask[1, n_prefix:].sum() == 10
    assert cache["blocks.0.hook_resid_pre"].shape == (2, n_prefix + 14, model.cfg.d_model)

    def drop_one(m, hook):
        m = m.clone()
        m[0, n_prefix + 5] = False  # a real patch of image 0
        return m

    keep = torch.ones(2, n_prefix + 14, dtype=torch.bool)
    keep[0, n_prefix + 5] = False
    with torch.no_grad():
        plain = model(batch._asdict())
        edited = model.run_with_hooks(batch._asdict(), fwd_hooks=[("embed.hook_patch_mask", drop_one)])
        removed = model(batch._asdict(), keep_mask=keep)
    assert not torch.allclose(edited[0], plain[0]) and torch.allclose(edited[1], plain[1], atol=1e-6)
    assert rel_err(edited, removed) < 1e-5


def test_patchify_layouts_and_refusals():
    model = HookedViT.from_timm(zoo.small_variant("naflexvit_base_patch16_gap")[0])
    img = torch.randn(1, 3, 32, 48)
    hwc, chw = patchify(img, (16, 16), "hwc"), patchify(img, (16, 16), "chw")
    assert hwc.shape == chw.shape == (1, 6, 768) and torch.equal(hwc[0, 4, :3], img[0, :, 16, 16])
    assert torch.equal(chw[0, 4, :16], img[0, 0, 16, 16:32])
    _, batch = two_aspect_ratios()
    shuffled = batch.patch_coord.clone()
    shuffled[0, [0, 1]] = shuffled[0, [1, 0]]
    with pytest.raises(UserError, match="row-major"):
        model(batch.patches, patch_coord=shuffled, patch_valid=batch.patch_valid)
    with pytest.raises(UserError, match="both patch_coord"):
        model(batch.patches, patch_coord=batch.patch_coord)
    with pytest.raises(UserError, match="exactly the keys"):
        model({"patches": batch.patches, "patch_coord": batch.patch_coord})
    with pytest.raises(UserError, match="patches have 768"):
        model(batch.patches[..., :700], patch_coord=batch.patch_coord, patch_valid=batch.patch_valid)


def test_plain_vit_refuses_naflex_inputs_and_has_no_mask_hook():
    from helpers import make_timm

    model = HookedViT.from_timm(make_timm("vit_tiny_patch16_224")[0])
    _, batch = two_aspect_ratios()
    assert "embed.hook_patch_mask" not in model.hook_dict
    with pytest.raises(UserError, match="naflex=True"):
        model(batch._asdict())


def test_weight_processing_keeps_naflex_logits():
    """fold_ln + centring (factorized tables included) + LayerScale folding leave NaFlex outputs unchanged."""
    timm_model, _ = zoo.small_variant("naflexvit_base_patch16_parfac_gap")
    _, batch = two_aspect_ratios()
    with torch.no_grad():
        ref = timm_model(batch._asdict())
        model = HookedViT.from_timm(timm_model, fold_ln=True, center_writing_weights=True, fold_layer_scale=True)
        out = model(batch._asdict())
    assert model.embed.pos_embed_y.mean(-1).abs().max() < 1e-6
    assert rel_err(out, ref) < 1e-5


def test_w_pos_of_grid_and_factorized_tables():
    for name, n in (("naflexvit_base_patch16_gap", 256), ("naflexvit_base_patch16_parfac_gap", 256)):
        model = HookedViT.from_timm(zoo.small_variant(name)[0])
        assert model.W_pos.shape == (n, model.cfg.d_model)
    e = model.embed
    assert torch.equal(model.W_pos[17], e.pos_embed_y[0, 1] + e.pos_embed_x[0, 1])  # row 1, col 1 of 16x16


def test_nothing_left_to_pool_is_refused():
    model = HookedViT.from_timm(zoo.small_variant("naflexvit_base_patch16_gap")[0])
    _, batch = two_aspect_ratios()
    keep = torch.ones(2, model.cfg.n_prefix_tokens + 14, dtype=torch.bool)
    keep[1, model.cfg.n_prefix_tokens:] = False  # image 1 keeps its registers only
    with pytest.raises(UserError, match="removes every pooled token"):
        model(batch._asdict(), keep_mask=keep)

    def drop_image_1(m, hook):
        m = m.clone()
        m[1, model.cfg.n_prefix_tokens:] = False
        return m

    with pytest.raises(UserError, match="no real token left to pool"):
        model.run_with_hooks(batch._asdict(), fwd_hooks=[("embed.hook_patch_mask", drop_image_1)])
