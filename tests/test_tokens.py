"""The token layout helpers every layer shares (hooked_vit.tokens)."""

import pytest
import torch

from circuits.decomposition.scoring import patch_grid
from circuits.explain.methods import upsample
from helpers import make_timm
from hooked_vit import HookedViT
from hooked_vit.tokens import token_grid, token_labels


def test_token_grid_square_given_and_refused():
    assert token_grid(49) == (7, 7)
    assert token_grid(6, (2, 3)) == (2, 3)
    with pytest.raises(ValueError, match="square"):
        token_grid(12)
    with pytest.raises(ValueError, match="holds 6 tokens"):
        token_grid(8, (2, 3))


def test_labels_and_grids_agree_with_the_model_layout():
    timm_model, _ = make_timm("vit_tiny_patch16_224", img_size=(32, 48), reg_tokens=2)
    model = HookedViT.from_timm(timm_model)
    labels = token_labels(model)
    assert labels[:3] == ["cls", "reg_0", "reg_1"] and labels[3] == "patch (0, 0)" and labels[-1] == "patch (1, 2)"
    assert len(labels) == model.cfg.n_ctx
    heat = torch.arange(model.cfg.n_ctx, dtype=torch.float32)[None]
    grid = patch_grid(heat, model)  # non-square grid from the config, prefix dropped
    assert grid.shape == (1, 2, 3) and grid[0, 1, 0] == 3 + 3
    assert upsample(heat[:, 3:], (32, 48), grid=model.cfg.grid_size, normalize=False).shape == (1, 32, 48)
    with pytest.raises(ValueError, match="square"):
        upsample(heat[:, 3:], (32, 48))
