"""HookedViT reproduces open_clip's ViT image towers, all parameters randomised."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip extra not installed: pip install 'hooked-vit[open_clip]'")

from helpers import images, randomize_
from hooked_vit import HookedViT
from hooked_vit.loading import UnsupportedModelError

RTOL = 1e-5
# Registered architectures with their towers shrunk so the test stays fast.
SMALL_VISION = dict(image_size=32, layers=2, width=48, head_width=12, mlp_ratio=2.0)
ARCHS = {"ViT-B-32": 8, "ViT-B-16-quickgelu": 8, "ViT-L-14": 8}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def make_clip(arch: str, ls_init_value=None):
    cfg = open_clip.get_model_config(arch)
    vision = {**cfg["vision_cfg"], **SMALL_VISION, "patch_size": ARCHS[arch]}
    if ls_init_value is not None:
        vision["ls_init_value"] = ls_init_value
    text = {**cfg["text_cfg"], "width": 32, "heads": 4, "layers": 1, "context_length": 16}
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text,
                           quick_gelu=cfg.get("quick_gelu", False)).eval()
    return randomize_(model, std=0.2)


def tower_reference(visual, x):
    blocks = []
    handles = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in visual.transformer.resblocks]
    with torch.no_grad():
        out = visual(x)
    for h in handles:
        h.remove()
    return out, blocks


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_matches_open_clip(arch, explicit):
    clip = make_clip(arch)
    x = images(32)
    ref, ref_blocks = tower_reference(clip.visual, x)
    model = HookedViT.from_open_clip(clip)
    assert model.cfg.act_fn == ("quick_gelu" if "quickgelu" in arch else "gelu")
    names = lambda n: n.endswith("resid_post") or (explicit and n.endswith("hook_pattern"))
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=names)
    assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
    assert out.shape == ref.shape == (2, 24)  # the image embedding, after the projection
    assert rel_err(out, ref) < RTOL
    for layer, block in enumerate(ref_blocks):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], block) < RTOL, f"block {layer}"


def test_layer_scale_and_registered_name():
    clip = make_clip("ViT-B-32", ls_init_value=0.5)
    randomize_(clip, seed=3)
    with torch.no_grad():
        assert rel_err(HookedViT.from_open_clip(clip)(images(32)), clip.visual(images(32))) < RTOL
    model = HookedViT.from_pretrained("open_clip:ViT-B-32")  # no tag: open_clip's own init, offline
    assert model.cfg.n_layers == 12 and model.cfg.n_classes == 512


def test_refuses_unknown_and_unsupported():
    with pytest.raises(UnsupportedModelError, match="does not know"):
        HookedViT.from_open_clip("ViT-Nonexistent")
    with pytest.raises(UnsupportedModelError, match="not open_clip's VisionTransformer"):
        HookedViT.from_open_clip(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_image_embed_hook_is_encode_image_and_edits_reach_the_logits(explicit):
    from hooked_vit.text_classes import install_text_classes

    clip = make_clip("ViT-B-32")
    x = images(32)
    emb = torch.nn.functional.normalize(torch.randn(5, 24, generator=torch.Generator().manual_seed(0)), dim=-1)
    model = install_text_classes(HookedViT.from_open_clip(clip), emb, scale=3.0)
    names = lambda n: n == "hook_image_embed" or (explicit and n.endswith("hook_pattern"))
    with torch.no_grad():
        ref = clip.encode_image(x)
        logits, cache = model.run_with_cache(x, names_filter=names)
    assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
    assert cache["hook_image_embed"].shape == (2, 24) and rel_err(cache["hook_image_embed"], ref) < RTOL
    assert rel_err(logits, 3.0 * ref @ emb.T) < RTOL
    shift = torch.randn(24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        edited = model.run_with_hooks(x, fwd_hooks=[("hook_image_embed", lambda act, hook: act + shift)])
    assert rel_err(edited, 3.0 * (ref + shift) @ emb.T) < RTOL
    # The folded unembedding is the projection then the text head: the logit lens still holds.
    torch.testing.assert_close(model.W_U, 3.0 * clip.visual.proj @ emb.T, rtol=1e-5, atol=1e-6)


def test_projection_survives_weight_processing_and_is_absent_elsewhere():
    from hooked_vit.text_classes import install_text_classes

    clip = make_clip("ViT-B-16-quickgelu")
    x = images(32)
    emb = torch.randn(4, 24, generator=torch.Generator().manual_seed(2))
    model = install_text_classes(HookedViT.from_open_clip(clip), emb)
    with torch.no_grad():
        before, cache = model.run_with_cache(x, names_filter="hook_image_embed")
        model.process_weights_()  # the final norm folds into image_proj (which gains its bias)
        after, cache2 = model.run_with_cache(x, names_filter="hook_image_embed")
        lens = model.to_class_logits(model(x, return_type="pooled")[:, None])[:, 0]
    assert model.image_proj.bias is not None and rel_err(after, before) < 1e-4
    assert rel_err(cache2["hook_image_embed"], cache["hook_image_embed"]) < 1e-4
    assert rel_err(lens, after) < 1e-4  # W_U / b_U carry the projection's folded bias
    raw = HookedViT.from_open_clip(clip).center_unembed()
    with torch.no_grad():
        centred = raw(x)
    torch.testing.assert_close(centred, clip.visual(x) - clip.visual(x).mean(-1, keepdim=True), rtol=1e-4, atol=1e-5)
    from helpers import make_timm

    timm_model, size = make_timm("vit_base_patch16_clip_224")
    plain = HookedViT.from_timm(timm_model)
    assert plain.image_proj is None and "hook_image_embed" not in plain.hook_dict
