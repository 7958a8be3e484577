"""HookedViT reproduces open_clip's ViT image towers, all parameters randomised."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip extra not installed: pip install 'hooked-vit[open_clip]'")

from helpers import images, randomize_, rel_err
from hooked_vit import HookedViT
from hooked_vit.loading import UnsupportedModelError

RTOL = 1e-5
# Registered architectures with their towers shrunk so the test stays fast.
SMALL_VISION = dict(image_size=32, layers=2, width=48, head_width=12, mlp_ratio=2.0)
ARCHS = {"ViT-B-32": 8, "ViT-B-16-quickgelu": 8, "ViT-L-14": 8}


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


# ------------------------------------------------------------------ timm-backed towers (SigLIP, EVA CLIP)
# open_clip's registered configs, with the timm trunk built small: open_clip's TimmModel calls
# timm.create_model(name, num_classes=..., global_pool=...); the size overrides are added there,
# so the tower is the registered timm architecture (its pooling, norms, RoPE, ...) at depth 2.
TIMM_SMALL = dict(depth=2, embed_dim=48, num_heads=4, img_size=32)
TIMM_ARCHS = {"ViT-B-16-SigLIP": 8, "ViT-B-16-SigLIP2": 8, "EVA02-B-16": 8}
TEXT_SMALL = dict(width=32, heads=4, layers=1, context_length=16, vocab_size=40)


def make_timm_clip(arch: str, monkeypatch, proj=None):
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **{**kw, **TIMM_SMALL,
                                                                                 "patch_size": TIMM_ARCHS[arch]}))
    cfg = open_clip.get_model_config(arch)
    vision = {**cfg["vision_cfg"], "image_size": 32}
    if proj is not None:
        vision["timm_proj"] = proj
    text = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    embed_dim = 48 if vision.get("timm_proj") == "none" else 24  # SigLIP: the pooled vector is the embedding
    model = open_clip.CustomTextCLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg={**text, **TEXT_SMALL}).eval()
    monkeypatch.setattr(timm, "create_model", create)
    return randomize_(model, std=0.2)


@pytest.mark.parametrize("arch", list(TIMM_ARCHS))
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_timm_towers_match_open_clip(arch, explicit, monkeypatch):
    clip = make_timm_clip(arch, monkeypatch)
    assert type(clip.visual).__name__ == "TimmModel" and len(clip.visual.trunk.blocks) == 2
    x = images(32)
    blocks = []
    handles = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in clip.visual.trunk.blocks]
    with torch.no_grad():
        ref = clip.encode_image(x)
    for h in handles:
        h.remove()
    model = HookedViT.from_open_clip(clip)
    siglip = "SigLIP" in arch
    assert model.cfg.global_pool == ("map" if siglip else "token")
    assert (model.image_proj is None) == siglip and (siglip or model.image_proj.bias is not None)
    names = lambda n: n.endswith("resid_post") or (explicit and n.endswith("hook_pattern"))
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=names)
    assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
    assert out.shape == ref.shape and rel_err(out, ref) < RTOL
    for layer, block in enumerate(blocks):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], block) < RTOL, f"block {layer}"


def char_tokenizer(texts, context=16):
    ids = torch.zeros(len(texts), context, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [1 + (ord(c) % 38) for c in t[: context - 1]] + [39]
        ids[i, : len(codes)] = torch.tensor(codes)
    return ids


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP", "EVA02-B-16"])
def test_timm_towers_text_classes(arch, monkeypatch):
    from hooked_vit.text_classes import install_text_classes, text_class_embeddings

    clip = make_timm_clip(arch, monkeypatch)
    names = ["cat", "dog", "boat"]
    emb = text_class_embeddings(clip, names, tokenizer=char_tokenizer)
    model = install_text_classes(HookedViT.from_open_clip(clip), emb, scale=2.0, class_names=names)
    x = images(32)
    with torch.no_grad():
        ref = 2.0 * clip.encode_image(x) @ emb.T
        logits = model(x)
    assert model.cfg.class_names == tuple(names) and rel_err(logits, ref) < RTOL
    with torch.no_grad():  # the logit lens of the pooled vector is the model's logits
        pooled = model(x, return_type="pooled")
        lens = torch.nn.functional.linear(pooled, model.W_U.T, model.b_U)
    assert rel_err(lens, logits) < RTOL
    with pytest.raises(ValueError, match="tokenizer"):  # SigLIP's / a custom vocabulary: not CLIP's BPE
        text_class_embeddings(clip, names)


def test_timm_tower_linear_projection_and_refused_mlp(monkeypatch):
    clip = make_timm_clip("ViT-B-16-SigLIP", monkeypatch, proj="linear")
    with torch.no_grad():
        assert rel_err(HookedViT.from_open_clip(clip)(images(32)), clip.encode_image(images(32))) < RTOL
    mlp = make_timm_clip("ViT-B-16-SigLIP", monkeypatch, proj="mlp")
    with pytest.raises(UnsupportedModelError, match="adapter head"):
        HookedViT.from_open_clip(mlp)
