"""Explanation methods (circuits.explain): formulas against hand computations, every
family, class specificity, and a hand-built model whose prediction reads one patch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuits.explain import (GRADIENT_METHODS, METHODS, explain, explain_many, readout_weights, trace,
                              upsample)
from circuits.explain.attention import rollout_matrix
from helpers import images, make_timm
from hooked_vit import HookedViT, HookedViTConfig

K_STAR = 5  # the patch the hand-built model reads


def one_patch_model(k_star: int = K_STAR, anchor: float = 10.0, sharp: float = 40.0, gain: float = 60.0,
                    offset: float = 10.0) -> HookedViT:
    """A 2-block HookedViT (16x16 images, 4x4 patches, 2 classes) whose class-1 logit
    reads the content (mean of channel 0) of patch `k_star` through the class token's
    attention in the last block; block 0 does nothing.

    Residual dims: 0 content, 1 key marker (patch k_star only), 2 query marker (class
    token), 3 attention output, 4/5 +-anchor (dominate LayerNorm statistics so the norms
    act almost linearly), 6/7 +-offset (attention bias, keeps the projection of the
    attention output off saturation).
    """
    cfg = HookedViTConfig(d_model=8, n_layers=2, n_heads=1, d_mlp=8, n_classes=2, img_size=16, patch_size=4)
    m = HookedViT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for blk in m.blocks:
            blk.ln1.weight.fill_(1)
            blk.ln2.weight.fill_(1)
        m.ln_final.weight.fill_(1)
        m.embed.proj.weight[0, 0] = 1 / 16
        m.embed.cls_token[0, 0, 2] = 1.0
        m.embed.pos_embed[0, :, 4], m.embed.pos_embed[0, :, 5] = anchor, -anchor
        m.embed.pos_embed[0, 1 + k_star, 1] = 1.0
        attn = m.blocks[1].attn
        attn.qkv.weight[0, 2] = sharp  # q <- query marker
        attn.qkv.weight[8, 1] = sharp  # k <- key marker: the class token attends to k_star
        attn.qkv.weight[16, 0] = 5.0  # v <- content
        attn.proj.weight[3, 0] = 1.0
        attn.proj.bias[6], attn.proj.bias[7] = offset, -offset
        m.head.weight[1, 3] = gain
        m.head.bias[1] = -gain * 0.02
    return m.eval()


def one_patch_images(k_star: int = K_STAR, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Patch k_star bright in channel 0 (class 1), every other pixel small noise."""
    x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.2 - 0.1
    r, c = divmod(k_star, 4)
    x[:, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1.0
    return x


def load(name: str, seed: int = 0, batch: int = 2):
    timm_model, size = make_timm(name, seed)
    return HookedViT.from_timm(timm_model), images(size, batch)


def patterns_and_grads(model: HookedViT, x: torch.Tensor, targets: torch.Tensor):
    """Independent capture: retain_grad on the pattern hooks, then .backward()."""
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act

    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        logits = model(x)
    logits[torch.arange(len(targets)), targets].sum().backward()
    return [kept[n].detach() for n in names], [kept[n].grad for n in names]


# ----------------------------------------------------------------------------- formulas
def test_rollout_rows_sum_to_one_and_match_the_product():
    model, x = load("vit_tiny_patch16_224")
    tr = trace(model, x)
    r = rollout_matrix(tr.patterns)
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[:2]))
    eye = torch.eye(r.shape[-1])
    hand = eye
    for a in tr.patterns:
        a = a.detach().mean(1)[0] + eye
        hand = (a / a.sum(-1, keepdim=True)) @ hand
    torch.testing.assert_close(r[0], hand)
    torch.testing.assert_close(explain("rollout", model, x)[0], hand[0, 1:])


def test_gae_equals_a_hand_computation_on_a_two_layer_model():
    model, x = load("vit_tiny_patch16_224", seed=3)
    assert model.cfg.n_layers == 2
    targets = torch.tensor([3, 7])
    pats, grads = patterns_and_grads(model, x, targets)
    rel = explain("gae", model, x, targets)
    p = pats[0].shape[-1]
    for i in range(2):
        r = torch.eye(p)
        for a, g in zip(pats, grads):
            heads = [torch.clamp(g[i, h] * a[i, h], min=0) for h in range(model.cfg.n_heads)]
            r = r + (sum(heads) / len(heads)) @ r
        torch.testing.assert_close(rel[i], r[0, 1:], rtol=1e-5, atol=1e-7)


def test_gradcam_equals_a_hand_computation():
    model, x = load("deit_tiny_patch16_224", seed=4)
    targets = torch.tensor([1, 2])
    pats, grads = patterns_and_grads(model, x, targets)
    a, g = pats[-1][:, :, 0, 1:], grads[-1][:, :, 0, 1:]  # class-token row, image keys
    hand = (g.mean(-1, keepdim=True) * a).mean(1).clamp(min=0)
    torch.testing.assert_close(explain("gradcam", model, x, targets), hand)


def test_class_embedding_uses_each_blocks_own_loss():
    """-sum over blocks of d CE(project(attn_out_l[CLS])) / d A_l[:, :, CLS, j], one
    backward per block, with the original's extra softmax as an option."""
    model, x = load("vit_base_patch16_224_miil", seed=5)
    targets = torch.tensor([0, 9])
    for extra in (False, True):
        hand = torch.zeros(2, model.cfg.n_patches)
        for l in range(model.cfg.n_layers):
            kept = {}

            def keep(act, hook):
                act.retain_grad()
                kept[hook.name] = act

            with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", keep), (f"blocks.{l}.hook_attn_out", keep)]):
                model(x)
            logits = model.to_class_logits(kept[f"blocks.{l}.hook_attn_out"][:, 0])
            logits = logits.softmax(-1) if extra else logits
            F.cross_entropy(logits, targets, reduction="sum").backward()
            hand -= kept[f"blocks.{l}.attn.hook_pattern"].grad[:, :, 0, 1:].sum(1)
        rel = explain("class_embedding", model, x, targets, extra_softmax=extra)
        torch.testing.assert_close(rel, hand, rtol=1e-4, atol=1e-7)


def test_tokentm_reduces_to_the_unnormalised_attention_product():
    model, x = load("vit_small_patch14_dinov2", seed=6)
    tr = trace(model, x, act_names=["blocks.0.hook_resid_pre"])
    p = tr.n_tokens
    prod = torch.eye(p)
    for a in tr.patterns:
        prod = 2 * (torch.eye(p) + a.detach().mean(1)) @ prod  # U_mlp = 2I, U_att = I + mean_h A
    ones = dict(length=False, necc="none", grad="none")
    rel = explain("tokentm", model, x, init="identity", **ones)
    torch.testing.assert_close(rel, prod[:, 0, 1:], rtol=1e-5, atol=1e-6)
    # C_0 = diag(L(E^0)) scales each source token by its embedded length.
    lengths = tr.acts["blocks.0.hook_resid_pre"].detach().norm(dim=-1)
    torch.testing.assert_close(explain("tokentm", model, x, **ones), prod[:, 0, 1:] * lengths[:, 1:],
                               rtol=1e-5, atol=1e-5)


def test_tokentm_options_change_the_map():
    model, x = load("vit_tiny_patch16_224", seed=7)
    base = explain("tokentm", model, x, targets=torch.tensor([1, 1]))
    for opts in (dict(necc="cosine"), dict(length=False), dict(grad="abs"), dict(attn_transform="output"),
                 dict(attn_transform="value"), dict(attn_transform="value", inputs="normalized"),
                 dict(init="identity")):
        other = explain("tokentm", model, x, targets=torch.tensor([1, 1]), **opts)
        assert torch.isfinite(other).all() and not torch.allclose(base, other), opts
    with pytest.raises(ValueError):
        explain("tokentm", model, x, necc="bogus")
    with pytest.raises(ValueError, match="inputs='normalized'"):
        explain("tokentm", model, x, inputs="normalized")  # the residual reading fixes E


# ----------------------------------------------------------------------------- behaviour
def test_class_specific_methods_change_with_the_target():
    model, x = load("vit_base_patch32_224", seed=8, batch=3)
    a = explain_many(model, x, torch.tensor([0, 1, 2]), list(METHODS))
    b = explain_many(model, x, torch.tensor([5, 6, 7]), list(METHODS))
    for name, method in METHODS.items():
        same = torch.allclose(a[name], b[name], atol=0)  # relative: some maps are tiny (LRP)
        assert same != method.class_specific, name


@pytest.mark.parametrize("name", ["vit_base_patch16_rpn_224", "deit_tiny_distilled_patch16_224",
                                  "vit_base_patch16_reg4_gap_256", "vit_small_patch14_reg4_dinov2",
                                  "vit_base_patch16_clip_224"])
def test_every_method_on_other_families(name):
    model, x = load(name)
    maps = explain_many(model, x, torch.tensor([1, 2]), [m for m in METHODS if METHODS[m].supports(model.cfg)])
    for method, rel in maps.items():
        assert rel.shape == (2, model.cfg.n_patches), method
        assert torch.isfinite(rel).all(), method


def test_readout_row_per_family():
    cls = readout_weights(HookedViTConfig(d_model=8, n_layers=1, n_heads=1, d_mlp=8, n_classes=2, n_reg_tokens=4), 9)
    assert cls.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]  # registers carry no query weight
    dist = readout_weights(HookedViTConfig(d_model=8, n_layers=1, n_heads=1, d_mlp=8, n_classes=2, distilled=True), 6)
    assert dist.tolist() == [0.5, 0.5, 0, 0, 0, 0]
    gap = readout_weights(HookedViTConfig(d_model=8, n_layers=1, n_heads=1, d_mlp=8, n_classes=2, class_token=False,
                                          n_reg_tokens=2, global_pool="avg"), 6)
    assert gap.tolist() == [0, 0, 0.25, 0.25, 0.25, 0.25]
    # For an average-pooled model the raw-attention map is the mean of the image-token rows.
    model, x = load("vit_base_patch16_rpn_224")
    pats, _ = patterns_and_grads(model, x, torch.tensor([0, 0]))
    torch.testing.assert_close(explain("attention", model, x), pats[-1].mean(1).mean(1))  # no prefix tokens


def test_gradients_do_not_need_trainable_weights_or_touch_them():
    model, x = load("vit_tiny_patch16_224", seed=9)
    expected = explain("gae", model, x, torch.tensor([1, 2]))
    model.requires_grad_(False)
    torch.testing.assert_close(explain("gae", model, x, torch.tensor([1, 2])), expected)
    model.requires_grad_(True)
    explain("tokentm", model, x)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_gradient_methods_work_with_grad_disabled(method):
    """notebooks/00_hooks_tour runs under torch.set_grad_enabled(False)."""
    model, x = load("vit_tiny_patch16_224", seed=3)
    expected = explain(method, model, x, torch.tensor([1, 2]))
    with torch.no_grad():
        torch.testing.assert_close(explain(method, model, x, torch.tensor([1, 2])), expected)
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        torch.testing.assert_close(explain(method, model, x, torch.tensor([1, 2])), expected)
    finally:
        torch.set_grad_enabled(previous)


def test_explain_many_equals_single_calls_and_specs_parse():
    model, x = load("vit_tiny_patch16_224", seed=10)
    t = torch.tensor([4, 5])
    many = explain_many(model, x, t, ["gae", "tokentm:necc=none,grad=none"])
    torch.testing.assert_close(many["gae"], explain("gae", model, x, t))
    torch.testing.assert_close(many["tokentm:necc=none,grad=none"], explain("tokentm", model, x, t, necc="none", grad="none"))
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain("saliency", model, x)


def test_upsample_is_bilinear_and_min_max_normalised():
    rel = torch.zeros(2, 16)
    rel[0, 5] = 3.0  # row 1, col 1 of a 4x4 grid
    pix = upsample(rel, 16)
    assert pix.shape == (2, 16, 16)
    assert pix[0].min() == 0 and pix[0].max() == 1
    r, c = divmod(int(pix[0].argmax()), 16)
    assert 4 <= r < 8 and 4 <= c < 8
    assert (pix[1] == 0).all()  # a constant map has no relevant pixel
    raw = upsample(rel, (16, 16), normalize=False)
    assert raw.max() < 3.0 and raw.max() > 1.0  # bilinear spreads the peak
    with pytest.raises(ValueError, match="square"):
        upsample(torch.zeros(1, 12), 16)


def test_the_read_patch_ranks_first_for_gradient_methods():
    model, x = one_patch_model(), one_patch_images()
    assert (model(x).argmax(-1) == 1).all()
    maps = explain_many(model, x, torch.ones(4, dtype=torch.long), list(METHODS))
    for method in GRADIENT_METHODS + ("attention", "rollout"):
        assert (maps[method].argmax(-1) == K_STAR).all(), method


def test_maps_see_patterns_edited_by_the_callers_hooks():
    model, x = load("vit_tiny_patch16_224", seed=11)

    def attend_to_patch_3(pattern, hook):
        edited = torch.zeros_like(pattern)
        edited[..., 1 + 3] = 1.0
        return edited

    hooks = [("blocks.1.attn.hook_pattern", attend_to_patch_3)]
    maps = explain_many(model, x, torch.tensor([0, 1]), ["attention", "gae"], fwd_hooks=hooks)
    assert (maps["attention"].argmax(-1) == 3).all()
    assert (maps["attention"].sum(-1) == 1).all()
    assert torch.isfinite(maps["gae"]).all()


def test_class_embedding_sums_the_chosen_blocks():
    model, x = load("vit_tiny_patch16_224", seed=12)
    t = torch.tensor([2, 3])
    per_block = [explain("class_embedding", model, x, t, layers=[l]) for l in range(model.cfg.n_layers)]
    torch.testing.assert_close(explain("class_embedding", model, x, t), sum(per_block))
    torch.testing.assert_close(explain("class_embedding:layers=-1", model, x, t), per_block[-1])
