"""Transformer attribution against the authors' own code (Chefer, Gur & Wolf, CVPR 2021,
Transformer-Explainability `LRP.generate_LRP(method="transformer_attribution")`): their maps
of a random 4-block ViT, made once by tests/fixtures/chefer/make_lrp_fixture.py, and ours on
the same weights, loaded through their (timm) state-dict names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuits.explain import explain
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.loading import Converted

FIXTURE = Path(__file__).parent / "fixtures" / "chefer" / "lrp_reference.safetensors"


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE))


def their_model(ref: dict, dtype: torch.dtype):
    """Their VisionTransformer(img_size=64, patch_size=16, embed_dim=24, depth=4, num_heads=3,
    mlp_ratio=4, qkv_bias=True, num_classes=10) as a HookedViT."""
    state = {k.removeprefix("weight."): v for k, v in ref.items() if k.startswith("weight.")}
    cfg = HookedViTConfig(d_model=24, n_layers=4, n_heads=3, d_mlp=96, n_classes=10, img_size=64, patch_size=16)
    model = HookedViT.from_converted(Converted(cfg, state)).eval()
    model.ln_final.eps = 1e-5  # their final norm is a default nn.LayerNorm; the blocks' have eps=1e-6
    return model.to(dtype)


def ours(ref: dict, dtype: torch.dtype) -> torch.Tensor:
    model = their_model(ref, dtype)
    maps = []
    for i, target, start in zip(ref["image"].tolist(), ref["target"].tolist(), ref["start_layer"].tolist()):
        x = ref["images"][i:i + 1].to(dtype) / 127.5 - 1
        maps.append(explain("transformer_attribution", model, x, torch.tensor([target]), start_layer=start)[0])
    return torch.stack(maps).double()


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per map: Pearson correlation and the L2 distance of the maps scaled to unit norm."""
    corr = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(a, b)])
    unit = lambda m: m / m.norm(dim=1, keepdim=True)
    return corr, (unit(a) - unit(b)).norm(dim=1)


def test_the_fixture_covers_several_images_targets_and_start_layers(reference):
    assert len(set(reference["image"].tolist())) == 4 and len(set(reference["start_layer"].tolist())) == 2
    assert len(set(zip(reference["image"].tolist(), reference["target"].tolist()))) == 8
    assert (reference["maps_float64"].std(1) > 0).all()  # not flat maps


def test_float64_maps_equal_the_authors_to_float_precision(reference):
    got, want = ours(reference, torch.float64), reference["maps_float64"]
    corr, dist = agreement(got, want)
    assert corr.min() > 1 - 1e-9 and dist.max() < 1e-6
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_float32_maps_agree_with_the_authors(reference):
    got = ours(reference, torch.float32)
    for key in ("maps_float32", "maps_float64"):
        corr, dist = agreement(got, reference[key])
        assert corr.min() >= 0.999 and dist.max() <= 0.01, (key, corr.min(), dist.max())
