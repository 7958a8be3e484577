"""`load_pretrained` / `HookedViT.from_pretrained`: one string per source."""

from __future__ import annotations

import pytest
import torch

from helpers import images, make_timm
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


def test_weight_processing_is_offered_by_every_source(tmp_path):
    """fold_ln & co. work the same for timm, hf and open_clip strings (they were timm-only and
    an open_clip string reported them as a missing-weights error)."""
    T = pytest.importorskip("transformers")
    hf = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=64, image_size=32, patch_size=8)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    plain, folded = load_pretrained(f"hf:{tmp_path}"), load_pretrained(f"hf:{tmp_path}", fold_ln=True)
    assert not torch.equal(plain.blocks[0].attn.W_Q, folded.blocks[0].attn.W_Q)  # the norm's weight went in
    with torch.no_grad():
        torch.testing.assert_close(folded(images(32)), plain(images(32)), rtol=1e-4, atol=1e-4)
    pytest.importorskip("open_clip")
    assert plain.cfg.normalization_type != "LNPre" and folded.cfg.normalization_type == "LNPre"
    clip_folded = load_pretrained("open_clip:ViT-B-32", fold_ln=True)
    assert clip_folded.cfg.normalization_type == "LNPre"
    with pytest.raises(TypeError, match="does not take these arguments"):
        load_pretrained("open_clip:ViT-B-32", no_such_option=1)
