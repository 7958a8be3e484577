"""Projection onto the class embedding space (logit lens) and class identifiability."""

from __future__ import annotations

import pytest
import torch

from circuits.identifiability import identifiability
from circuits.projection import class_rank, project_batch
from helpers import images, make_timm
from hooked_vit import HookedViT


def load(name):
    timm_model, size = make_timm(name)
    return HookedViT.from_timm(timm_model), timm_model, images(size, batch=3)


def test_last_block_class_token_projection_equals_logits():
    model, _, x = load("vit_tiny_patch16_224")
    targets = torch.tensor([1, 4, 7])
    proj = project_batch(model, x, targets)
    logits = model(x)
    torch.testing.assert_close(proj.target_logit[:, 0, -1, 0], logits[torch.arange(3), targets], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.topk[:, 0, -1, 0, 0], logits.argmax(-1))
    torch.testing.assert_close(proj.rank[:, 0, -1, 0], class_rank(logits, targets))


def test_ranks_equal_full_argsort():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=gen)
    target = torch.randint(0, 50, (4, 7), generator=gen)
    order = logits.argsort(-1, descending=True)
    expected = (order == target[..., None]).float().argmax(-1)
    torch.testing.assert_close(class_rank(logits, target).long(), expected)
    assert identifiability(torch.tensor([0, 25, 49]), 50).tolist() == pytest.approx([1.0, 0.5, 0.02])


def test_every_site_matches_a_hand_projection_from_the_cache():
    model, timm_model, x = load("deit3_small_patch16_224")  # LayerScale: attn_out includes gamma
    targets = torch.tensor([0, 5, 9])
    proj = project_batch(model, x, targets, sites=("block", "attn", "mlp"))
    _, cache = model.run_with_cache(x)
    for s, hook in enumerate(("hook_resid_post", "hook_attn_out", "hook_mlp_out")):
        act = cache[f"blocks.1.{hook}"]
        hand = timm_model.head(timm_model.norm(act))  # timm's own modules, per token
        expected = hand.gather(-1, targets[:, None, None].expand(-1, act.shape[1], 1))[..., 0]
        torch.testing.assert_close(proj.target_logit[:, s, 1], expected, rtol=1e-4, atol=1e-4)
    # The streams entering the block and between the sublayers: target logits only.
    hand_mid = timm_model.head(timm_model.norm(cache["blocks.1.hook_resid_mid"]))
    torch.testing.assert_close(proj.mid_target_logit[:, 1], hand_mid[torch.arange(3), :, targets], rtol=1e-4, atol=1e-4)


def test_gap_post_norm_model_uses_fc_norm_per_token():
    model, timm_model, x = load("vit_base_patch16_rpn_224")
    assert model.cfg.final_norm == "pooled" and model.cfg.block_type == "post_norm"
    targets = torch.tensor([2, 3, 4])
    proj = project_batch(model, x, targets)
    _, cache = model.run_with_cache(x)
    last = cache["blocks.1.hook_resid_post"]
    hand = timm_model.head(timm_model.fc_norm(last))  # fc_norm applied to every token
    torch.testing.assert_close(proj.target_logit[:, 0, -1], hand[torch.arange(3), :, targets], rtol=1e-4, atol=1e-4)
    # Projecting the pooled stream reproduces the model's logits.
    pooled = last[:, model.cfg.n_prefix_tokens:].mean(1)
    torch.testing.assert_close(model.to_class_logits(pooled), model(x), rtol=1e-5, atol=1e-5)


def test_distilled_projection_averages_heads():
    model, timm_model, x = load("deit_tiny_distilled_patch16_224")
    _, cache = model.run_with_cache(x)
    h = cache["blocks.1.hook_resid_post"]
    normed = timm_model.norm(h)
    expected = (timm_model.head(normed) + timm_model.head_dist(normed)) / 2
    torch.testing.assert_close(model.to_class_logits(h), expected, rtol=1e-5, atol=1e-5)


def test_targets_default_to_prediction():
    model, _, x = load("vit_tiny_patch16_224")
    proj = project_batch(model, x)
    torch.testing.assert_close(proj.targets, model(x).argmax(-1))
    assert (proj.rank[:, 0, -1, 0] == 0).all()
