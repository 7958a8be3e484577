"""HookedViT reproduces open_clip's ViT image towers, all parameters randomised."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip extra not installed: pip install 'hooked-vit[open_clip]'")

from conftest import images, randomize_
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
