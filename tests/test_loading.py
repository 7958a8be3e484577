"""Loading: checkpoints (safe), unsupported features, round trips, headless towers."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from helpers import images, make_timm
from hooked_vit import CheckpointError, HookedViT, UnsupportedModelError, UserError, load_checkpoint


def test_checkpoint_safetensors_and_pth_load_the_same_weights(tmp_path):
    source, size = make_timm("vit_tiny_patch16_224", seed=5)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    kwargs = dict(depth=2, embed_dim=48, num_heads=4, num_classes=10, img_size=48)
    x = images(size)
    expected = source(x)
    for file in ("w.safetensors", "w.pth"):
        model = HookedViT.from_timm("vit_tiny_patch16_224", checkpoint_path=tmp_path / file, **kwargs)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['HOOKED_VIT_PWNED']}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HOOKED_VIT_PWNED", str(marker))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    source, _ = make_timm("vit_tiny_patch16_224")
    state = source.state_dict()
    state.pop("head.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        HookedViT.from_timm("vit_tiny_patch16_224", checkpoint_path=tmp_path / "bad.safetensors",
                            depth=2, embed_dim=48, num_heads=4, num_classes=10, img_size=48)
    assert "head.bias" in str(err.value) and "extra.weight" in str(err.value)


def test_missing_checkpoint_file_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


class CustomBlock(timm.models.vision_transformer.Block):
    """A block class HookedViT does not know (every timm ViT block type is read since DiffParallelScalingBlock)."""


@pytest.mark.parametrize("kwargs,feature", [
    (dict(block_fn=CustomBlock), "block type CustomBlock"),
    (dict(global_pool=""), "global_pool=''"),
])
def test_unsupported_features_are_named(kwargs, feature):
    model = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, img_size=32, **kwargs)
    with pytest.raises(UnsupportedModelError, match=feature):
        HookedViT.from_timm(model)


def test_non_vit_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="unsupported feature: model class Linear"):
        HookedViT.from_timm(torch.nn.Linear(2, 2))


def test_timm_state_dict_round_trip(family):
    timm_model, size = make_timm(family)
    model = HookedViT.from_timm(timm_model)
    fresh, _ = make_timm(family, seed=99)
    fresh.load_state_dict(model.to_timm_state_dict())  # strict
    x = images(size)
    torch.testing.assert_close(fresh(x), timm_model(x))


def test_headless_tower_returns_features_and_refuses_projection():
    timm_model, size = make_timm("vit_small_patch14_dinov2", num_classes=0)
    model = HookedViT.from_timm(timm_model)
    x = images(size)
    torch.testing.assert_close(model(x), timm_model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no classifier head"):
        model.W_U


def test_dtype_and_device_arguments():
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model = HookedViT.from_timm(timm_model, dtype=torch.bfloat16)
    assert model.W_E.dtype == torch.bfloat16
    out = model(images(size).to(torch.bfloat16))
    ref = timm_model(images(size))
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_build_options_with_a_built_model_are_refused():
    timm_model, _ = make_timm("vit_tiny_patch16_224")
    with pytest.raises(TypeError, match=r"\['bogus_kw', 'img_size', 'num_classes'\].*built VisionTransformer"):
        HookedViT.from_timm(timm_model, num_classes=5, img_size=64, bogus_kw=1)
    with pytest.raises(ValueError, match="pretrained=True"):
        HookedViT.from_timm(timm_model, pretrained=True)


def test_build_options_with_a_name_go_to_timm():
    model = HookedViT.from_timm("vit_tiny_patch16_224", depth=1, num_classes=5, img_size=32)
    assert (model.cfg.n_layers, model.cfg.n_classes, model.cfg.img_size) == (1, 5, (32, 32))
    with pytest.raises(UserError, match="does not accept 'bogus_kw'"):
        HookedViT.from_timm("vit_tiny_patch16_224", depth=1, bogus_kw=1)
    with pytest.raises(UserError, match="depth='two'"):  # a word where a number belongs (issue 23 item 10)
        HookedViT.from_timm("vit_tiny_patch16_224", depth="two")


def test_bad_forward_options_are_refused():
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model = HookedViT.from_timm(timm_model)
    x = images(size)
    with pytest.raises(ValueError, match="return_type='bogus' is not one of"):
        model(x, return_type="bogus")
    with pytest.raises(ValueError, match="targets are only read"):
        model(x, targets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"unknown HookedViTConfig fields \['bogus'\]"):
        type(model.cfg).from_dict({**model.cfg.to_dict(), "bogus": 1})
