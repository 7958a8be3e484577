"""`HookedViT.vision_features` is exactly what LLaVA's projector reads (transformers'
`LlavaForConditionalGeneration.get_image_features`, captured at the projector's input), on a
tiny random LLaVA with a CLIP tower, every parameter randomised; `from_hf` of a LLaVA model
loads its vision tower with the model's read-out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from helpers import images, randomize_, rel_err
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.vlm import hidden_state_hook

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64)


def make_llava(layer=-2, strategy="default") -> torch.nn.Module:
    config = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT),
                           vision_feature_layer=layer, vision_feature_select_strategy=strategy, image_token_index=63)
    return randomize_(T.LlavaForConditionalGeneration(config).eval(), std=0.2)


def projector_input(llava, x, layer, strategy) -> torch.Tensor:
    seen = []
    handle = llava.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        llava.get_image_features(pixel_values=x, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    handle.remove()
    return seen[0]


# -4 is the embeddings (index 0) of the 3-block tower; transformers' get_image_features cannot
# take 0 itself (it passes the layer as output_hidden_states, and 0 is falsy).
@pytest.mark.parametrize("layer, strategy", [(-2, "default"), (-2, "full"), (-1, "default"), (-4, "full"),
                                             ([-2, 1], "default"), ([-4, -1], "full")])
def test_features_are_what_the_projector_reads(layer, strategy):
    llava = make_llava(layer, strategy)
    x = images(32)
    ref = projector_input(llava, x, layer, strategy)
    model = HookedViT.from_hf(llava)
    assert model.cfg.vision_feature_layer == layer and model.cfg.vision_feature_select_strategy == strategy
    with torch.no_grad():
        out = model.vision_features(x)  # the model's own read-out
        explicit = model.vision_features(x, layer=layer, strategy=strategy)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5
    torch.testing.assert_close(out, explicit, rtol=0, atol=0)
    n_tokens = 16 + (strategy == "full")
    width = 48 * (1 if isinstance(layer, int) else len(layer))
    assert out.shape == (2, n_tokens, width)


def test_from_a_folder_and_defaults(tmp_path):
    llava = make_llava()
    llava.save_pretrained(tmp_path)
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path)
    model = HookedViT.from_hf(str(tmp_path))
    assert model.cfg.data_config["mean"] == [0.1, 0.2, 0.3] and model.cfg.n_layers == 3
    x = images(32)
    with torch.no_grad():
        assert rel_err(model.vision_features(x), projector_input(llava, x, -2, "default")) < 1e-5
    # A tower not loaded from a VLM reads LLaVA's defaults (-2, "default").
    plain = HookedViT.from_hf(llava.model.vision_tower)
    assert plain.cfg.vision_feature_layer is None
    with torch.no_grad():
        assert rel_err(plain.vision_features(x), projector_input(llava, x, -2, "default")) < 1e-5


def test_hidden_state_index_names_the_hook_and_edits_flow():
    model = HookedViT.from_hf(make_llava())
    assert hidden_state_hook(3, -2) == "blocks.2.hook_resid_pre"  # block 1's output
    assert hidden_state_hook(3, -1) == "blocks.2.hook_resid_post" and hidden_state_hook(3, 0) == "blocks.0.hook_resid_pre"
    x = images(32)
    with torch.no_grad():
        clean = model.vision_features(x)
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, hook: a * 0)]):
            edited = model.vision_features(x)
    assert rel_err(edited, clean) > 1e-3
    x.requires_grad_(True)
    model.vision_features(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_refusals():
    from hooked_vit.errors import UnsupportedModelError
    from hooked_vit.loading_hf import _check_class_name

    with pytest.raises(UnsupportedModelError, match="pass the VLM's vision tower module"):
        _check_class_name("PaliGemmaForConditionalGeneration")
    model = HookedViT.from_hf(make_llava())
    with pytest.raises(UserError, match="out of range"):
        model.vision_features(images(32), layer=4)
    with pytest.raises(UserError, match="not one of"):
        model.vision_features(images(32), strategy="cls")
