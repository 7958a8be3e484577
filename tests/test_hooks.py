"""Hook points: names, documented shapes, live edits, invariants and clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformer_lens.utilities import get_act_name

from helpers import images, make_timm
from hooked_vit import HookedViT


@pytest.fixture(scope="module")
def vit():
    timm_model, size = make_timm("vit_base_patch16_reg4_gap_256")  # registers + GAP
    model = HookedViT.from_timm(timm_model)
    model.set_use_attn_result(True)
    return model, size


def expected_shapes(cfg, b: int, p: int) -> dict[str, tuple]:
    d, h, e, m = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    shapes = {
        "hook_embed": (b, p, d),
        "hook_pos_embed": (b, p, d),
        "hook_pooled": (b, d),
        "hook_logits": (b, cfg.n_classes),
        "ln_final.hook_scale": (b, 1),  # GAP model: the final norm acts on the pooled vector
        "ln_final.hook_normalized": (b, d),
    }
    for l in range(cfg.n_layers):
        blk = f"blocks.{l}."
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
                     "ln1.hook_normalized", "ln2.hook_normalized"):
            shapes[blk + name] = (b, p, d)
        for name in ("ln1.hook_scale", "ln2.hook_scale"):
            shapes[blk + name] = (b, p, 1)
        for name in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"):
            shapes[blk + name] = (b, p, h, e)
        for name in ("attn.hook_attn_scores", "attn.hook_pattern"):
            shapes[blk + name] = (b, h, p, p)
        shapes[blk + "attn.hook_result"] = (b, p, h, d)
        shapes[blk + "mlp.hook_pre"] = (b, p, m)
        shapes[blk + "mlp.hook_post"] = (b, p, m)
    return shapes


# Hook points that fire only with a config flag (TransformerLens's optional hooks).
OPTIONAL_HOOKS = {
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_attn_in": ("hook_attn_in",),
    "use_hook_mlp_in": ("hook_mlp_in",),
}


def flag_hooks(model, flag):
    return {n for n in model.hook_dict if n.endswith(OPTIONAL_HOOKS[flag])}


def test_every_hook_fires_with_documented_shape(vit):
    model, size = vit
    x = images(size, batch=3)
    _, cache = model.run_with_cache(x)
    p = model.cfg.n_prefix_tokens + (size // 16) ** 2
    expected = expected_shapes(model.cfg, 3, p)
    optional = set().union(*(flag_hooks(model, f) for f in OPTIONAL_HOOKS))
    assert set(cache.keys()) == set(expected) == set(model.hook_dict) - optional
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    cfg = model.cfg
    for flags in (("use_split_qkv_input", "use_hook_mlp_in"), ("use_attn_in",)):
        for f in flags:
            setattr(cfg, f, True)
        try:
            _, cache = model.run_with_cache(x)
        finally:
            for f in flags:
                setattr(cfg, f, False)
        for name in set().union(*(flag_hooks(model, f) for f in flags)):
            want = (3, p, cfg.d_model) if name.endswith("hook_mlp_in") else (3, p, cfg.n_heads, cfg.d_model)
            assert tuple(cache[name].shape) == want, name


def test_residual_invariants(family):
    model = HookedViT.from_timm(make_timm(family)[0])
    _, cache = model.run_with_cache(images(make_timm(family)[1]))
    for l in range(model.cfg.n_layers):
        pre, mid, post = (cache[f"blocks.{l}.hook_resid_{s}"] for s in ("pre", "mid", "post"))
        torch.testing.assert_close(mid, pre + cache[f"blocks.{l}.hook_attn_out"], rtol=0, atol=1e-6)
        torch.testing.assert_close(post, mid + cache[f"blocks.{l}.hook_mlp_out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("hook", ["attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_z",
                                  "attn.hook_q", "attn.hook_v", "mlp.hook_post", "ln1.hook_scale"])
def test_edits_returned_by_hooks_change_the_output(vit, hook):
    model, size = vit
    x = images(size)
    clean = model(x)

    def edit(act, hook):
        if hook.name.endswith("hook_pattern"):  # attend uniformly
            return torch.full_like(act, 1.0 / act.shape[-1])
        if hook.name.endswith("hook_attn_scores"):
            return torch.zeros_like(act)
        return act * 2.0

    edited = model.run_with_hooks(x, fwd_hooks=[(f"blocks.1.{hook}", edit)])
    assert not torch.allclose(edited, clean, atol=1e-4)


def test_uniform_pattern_gives_mean_of_values(vit):
    model, size = vit
    x = images(size)
    uniform = lambda act, hook: torch.full_like(act, 1.0 / act.shape[-1])
    store = {}
    save = lambda name: (lambda act, hook: store.__setitem__(name, act))
    model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform),
                                       ("blocks.0.attn.hook_v", save("v")), ("blocks.0.attn.hook_z", save("z"))])
    expected = store["v"].mean(1, keepdim=True).expand_as(store["v"])
    torch.testing.assert_close(store["z"], expected, rtol=1e-5, atol=1e-6)


def test_fused_and_explicit_paths_agree(vit):
    model, size = vit
    x = images(size)
    fused = model(x)
    explicit = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: a)])
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_unknown_hook_name_is_a_clear_error(vit):
    model, size = vit
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        model.run_with_hooks(images(size), fwd_hooks=[("blocks.0.attn.hook_patern", lambda a, hook: a)])
    with pytest.raises(KeyError, match="unknown hook point"):
        model.run_with_cache(images(size), names_filter=["blocks.0.hook_resid"])


def test_bad_images_are_clear_errors(vit):
    model, size = vit
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, size, size))
    with pytest.raises(ValueError, match=f"expected images of {size}x{size} pixels, got 32x32"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="add a batch dimension"):
        model(torch.randn(3, size, size))


def test_keep_mask_all_true_reproduces_plain_run(vit):
    model, size = vit
    x = images(size)
    keep = torch.ones(2, model.cfg.n_prefix_tokens + (size // 16) ** 2, dtype=torch.bool)
    torch.testing.assert_close(model(x, keep_mask=keep), model(x), rtol=1e-5, atol=1e-5)


def test_keep_mask_batch_equals_each_image_alone(vit):
    model, size = vit
    x = images(size, batch=3)
    n = model.cfg.n_prefix_tokens + (size // 16) ** 2
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(3, n, generator=gen) > 0.4
    keep[:, 0] = keep[:, -1] = True
    keep[1] = True  # one full row, so rows have different lengths
    batched = model(x, keep_mask=keep)
    for i in range(3):
        alone = model(x[i : i + 1], keep_mask=keep[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched, model(x), atol=1e-3)  # removal did change the output
    # And the explicit attention path handles the padding the same way.
    explicit = model.run_with_hooks(x, keep_mask=keep, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: a)])
    torch.testing.assert_close(explicit, batched, rtol=1e-4, atol=1e-5)


def test_start_and_stop_at_layer_compose(vit):
    model, size = vit
    x = images(size)
    mid = model(x, stop_at_layer=1)
    torch.testing.assert_close(model(mid, start_at_layer=1), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_layer_norm_scale_edits_flow_downstream(vit, inplace):
    model, size = vit
    x = images(size)
    _, cache = model.run_with_cache(x, names_filter=["blocks.0.ln1.hook_scale", "blocks.0.hook_resid_pre",
                                                      "blocks.0.ln1.hook_normalized"])
    resid, scale = cache["blocks.0.hook_resid_pre"], cache["blocks.0.ln1.hook_scale"]
    ln = model.blocks[0].ln1
    torch.testing.assert_close(scale, (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt())
    seen = {}

    def double(act, hook):
        if inplace:
            act.mul_(2.0)
            return None
        return act * 2.0

    model.run_with_hooks(x, fwd_hooks=[("blocks.0.ln1.hook_scale", double),
                                       ("blocks.0.ln1.hook_normalized", lambda a, hook: seen.setdefault("n", a))])
    centred = resid - resid.mean(-1, keepdim=True)
    expected = centred / (2 * scale) * ln.weight + ln.bias
    torch.testing.assert_close(seen["n"], expected, rtol=1e-5, atol=1e-5)


def test_keep_mask_with_start_at_layer_is_refused(vit):
    model, size = vit
    resid = model(images(size), stop_at_layer=1)
    with pytest.raises(ValueError, match="keep_mask acts after the embedding"):
        model(resid, start_at_layer=1, keep_mask=torch.ones(resid.shape[:2], dtype=torch.bool))


def test_loss_return_type_caches_gradients(vit):
    model, size = vit
    x, targets = images(size), torch.tensor([1, 3])
    loss, cache = model.run_with_cache(x, incl_bwd=True, return_type="loss", targets=targets,
                                       names_filter=["blocks.1.hook_resid_pre", "hook_logits"])
    logits = cache["hook_logits"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets))
    # d loss / d logits of a mean cross-entropy is (softmax - one_hot) / batch.
    expected = (logits.softmax(-1) - torch.nn.functional.one_hot(targets, logits.shape[-1])) / 2
    torch.testing.assert_close(cache["hook_logits_grad"], expected, rtol=1e-5, atol=1e-6)
    assert cache["blocks.1.hook_resid_pre_grad"].shape == cache["blocks.1.hook_resid_pre"].shape
    with pytest.raises(ValueError, match="needs targets"):
        model(x, return_type="loss")


def test_frozen_layer_norm_scale_keeps_centring_in_the_gradient(vit):
    """Freezing ln.hook_scale at its clean value (docs/writing_hooks.md): the gradient is
    autograd of (x - mean) / frozen * w + b, so per token it sums to zero."""
    model, size = vit
    x = images(size)
    _, clean = model.run_with_cache(x, names_filter="blocks.1.ln1.hook_scale")
    frozen = clean["blocks.1.ln1.hook_scale"]
    grads = {}

    def keep_grad(act, hook):
        act.retain_grad()
        grads["resid"] = act

    model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_pre", keep_grad),
                                       ("blocks.1.ln1.hook_scale", lambda act, hook: frozen)])
    resid = grads["resid"]
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", keep_grad),
                                ("blocks.1.ln1.hook_scale", lambda act, hook: frozen)]):
        model(x).sum().backward()
    got = grads["resid"].grad
    torch.testing.assert_close(got.sum(-1), torch.zeros_like(got.sum(-1)), rtol=0, atol=1e-5)

    # The same quantity from the explicit formula, with the rest of the model unchanged.
    resid = grads["resid"].detach().requires_grad_(True)
    ln = model.blocks[1].ln1
    normed = (resid - resid.mean(-1, keepdim=True)) / frozen * ln.weight + ln.bias
    with model.hooks(fwd_hooks=[("blocks.1.ln1.hook_normalized", lambda act, hook: normed)]):
        model(resid, start_at_layer=1).sum().backward()
    torch.testing.assert_close(got, resid.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("flags", [(), ("use_split_qkv_input", "use_hook_mlp_in"), ("use_attn_in",)])
def test_every_hook_point_fires_backward_hooks(fused, flags):
    timm_model, size = make_timm("vit_base_patch16_reg4_gap_256")
    model = HookedViT.from_timm(timm_model)
    model.set_use_attn_result(True)
    model.cfg.use_fused_attn = fused
    for f in flags:
        setattr(model.cfg, f, True)
    off = set().union(*(flag_hooks(model, f) for f in OPTIONAL_HOOKS if f not in flags))
    # Hooking scores or pattern forces the explicit path; leave them out to cover SDPA.
    names = [n for n in model.hook_dict
             if n not in off and not (fused and n.endswith(("hook_attn_scores", "hook_pattern")))]
    fired = set()
    bwd = [(n, lambda grad, hook: fired.add(hook.name)) for n in names]
    with model.hooks(bwd_hooks=bwd):
        model(images(size)).sum().backward()
    assert fired == set(names)
    _, cache = model.run_with_cache(images(size), incl_bwd=True, return_type="loss",
                                    targets=torch.tensor([0, 1]))
    assert {n for n in cache.keys() if n.endswith("_grad")} == {n + "_grad" for n in set(model.hook_dict) - off}


@pytest.mark.parametrize("hook,flag", [("hook_q_input", "use_split_qkv_input"),
                                       ("hook_v_input", "use_split_qkv_input"),
                                       ("hook_attn_in", "use_attn_in"),
                                       ("hook_mlp_in", "use_hook_mlp_in")])
def test_edits_at_optional_hooks_flow(vit, hook, flag):
    model, size = vit
    x = images(size)
    name = get_act_name(hook.removeprefix("hook_"), 1)  # where TransformerLens code looks
    assert name == f"blocks.1.{hook}" and name in model.hook_dict
    getattr(model, f"set_{flag}")(True)
    try:
        clean, cache = model.run_with_cache(x, names_filter=[name, "blocks.1.hook_resid_mid"])
        if hook == "hook_mlp_in":  # a copy: the MLP reads it, the residual stream does not
            torch.testing.assert_close(cache[name], cache["blocks.1.hook_resid_mid"])
        # Reverse the positions (scaling would be undone by the LayerNorm that follows).
        edited = model.run_with_hooks(x, fwd_hooks=[(name, lambda act, hook: act.flip(1))])
        if hook != "hook_mlp_in":  # an edit of one head's copy changes only that head
            one = model.run_with_hooks(x, fwd_hooks=[(name, lambda act, hook: torch.cat(
                [act[:, :, :1].flip(1), act[:, :, 1:]], dim=2))])
            assert not torch.allclose(one, clean) and not torch.allclose(one, edited)
    finally:
        getattr(model, f"set_{flag}")(False)
    assert not torch.allclose(edited, clean, atol=1e-4)
    with pytest.raises(ValueError, match="mutually exclusive"):
        model.set_use_attn_in(True)
        model.set_use_split_qkv_input(True)
    model.set_use_attn_in(False)
    with pytest.raises(ValueError, match="mutually exclusive"):  # refused in the config too, not at forward
        dataclasses.replace(model.cfg, use_attn_in=True, use_split_qkv_input=True)


@pytest.mark.parametrize("grad", [True, False])
def test_layer_norm_scale_edit_same_with_and_without_autograd(vit, grad):
    model, size = vit
    x = images(size)
    with torch.set_grad_enabled(grad):
        out = model.run_with_hooks(x, fwd_hooks=[("blocks.0.ln2.hook_scale", lambda a, hook: a * 1.5)])
        _, cache = model.run_with_cache(x, names_filter="blocks.0.ln2.hook_scale")
    ln = model.blocks[0].ln2
    mid = model.run_with_cache(x, names_filter="blocks.0.hook_resid_mid")[1]["blocks.0.hook_resid_mid"]
    torch.testing.assert_close(cache["blocks.0.ln2.hook_scale"],
                               (mid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt())
    assert not torch.allclose(out, model(x), atol=1e-4)
    with torch.no_grad() if grad else torch.enable_grad():
        other = model.run_with_hooks(x, fwd_hooks=[("blocks.0.ln2.hook_scale", lambda a, hook: a * 1.5)])
    torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-5)
