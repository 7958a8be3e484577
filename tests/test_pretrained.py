"""`load_pretrained` / `HookedViT.from_pretrained`: one string per source."""

from __future__ import annotations

import pytest
import torch

from conftest import images, make_timm
from hooked_vit import HookedViT
from hooked_vit.pretrained import load_pretrained


def test_timm_prefix_and_bare_name_load_the_same_architecture():
    a = load_pretrained("timm:vit_tiny_patch16_224", pretrained=False, img_size=48, depth=2)
    b = HookedViT.from_pretrained("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=2)
    assert a.cfg.n_layers == b.cfg.n_layers == 2 and a.cfg.img_size == (48, 48)


def test_hf_prefix_loads_a_folder(tmp_path):
    T = pytest.importorskip("transformers")
    hf = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=64, image_size=32, patch_size=8)).eval()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(f"hf:{tmp_path}")
    with torch.no_grad():
        assert torch.allclose(model(images(32)), hf(pixel_values=images(32)).logits, atol=1e-5)


@pytest.mark.parametrize("spec, message", [("foo:bar", "unknown model source 'foo'"), ("timm:", "names no model"),
                                           ("open_clip:", "names no model")])
def test_bad_strings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained(spec)
    with pytest.raises(TypeError, match="model string"):
        load_pretrained(None)
