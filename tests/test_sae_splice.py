"""Splicing with SAELens's semantics: the error term is computed from the unedited input
without gradient, so feature edits reach the logits and gradients flow through the
dictionary only; SAELens's hook names and HookedSAETransformer methods on HookedViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.formats import load_saelens
from circuits.sae.splice import attach_dictionary, detach_dictionary, spliced
from hooked_vit import HookedViT
from helpers import randomize_

FIX = Path(__file__).parent / "fixtures" / "saelens"
HOOK = "blocks.1.hook_resid_post"
NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
         "hook_sae_output")


def _model():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, num_classes=5)
    return HookedViT.from_timm(randomize_(vit.eval(), seed=5))


def _sae(hook=HOOK, d=32, arch="relu", seed=2, **kw):
    sae = SparseDictionary(DictionaryConfig(d, 3 * d, arch, k=5, hook_name=hook, **kw), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return sae.eval()


def _zero(acts, hook):
    return acts * 0


def test_error_term_matches_saelens_fixture():
    """SAELens's SAE.forward(use_error_term=True), every feature zeroed at hook_sae_acts_post,
    and its input gradients, on a folder SAELens wrote."""
    sae = load_saelens(FIX / "theirs" / "standard")
    sae.use_error_term = True
    want = load_file(FIX / "error_term.safetensors")
    x = want["x"].clone().requires_grad_(True)
    ablated = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", _zero)])
    torch.testing.assert_close(ablated, want["ablated"], rtol=1e-5, atol=1e-5)
    # hand-computed: decode(0) + (x - recons(x))
    torch.testing.assert_close(ablated, sae.b_dec + (want["x"] - sae.decode(sae.encode(want["x"]))), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad((ablated * want["w"]).sum(), x)
    torch.testing.assert_close(grad, want["grad_ablated"])  # zero: no path past the ablated features
    x = want["x"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((sae(x) * want["w"]).sum(), x)
    torch.testing.assert_close(grad, want["grad"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grad, want["w"], atol=1e-2)  # not the identity of an error with gradient


def _ablation_reference(model, sae, images):
    """The convention by hand on the plain model: recons of zero features + (x - recons(x))."""
    def hook(x, hook):
        with torch.no_grad():
            clean = sae.decode(sae.encode(x))
        return sae.decode(torch.zeros_like(sae.encode(x))) + (x - clean)
    return model.run_with_hooks(images, fwd_hooks=[(sae.cfg.hook_name, hook)])


def _gradient_reference(model, sae, images):
    """Dictionary-path gradient: the spliced value sae(x) + const, by hand."""
    def hook(x, hook):
        recons = sae.decode(sae.encode(x))
        return recons + (x - recons).detach()
    images = images.clone().requires_grad_(True)
    logits = model.run_with_hooks(images, fwd_hooks=[(sae.cfg.hook_name, hook)])
    return torch.autograd.grad(logits.logsumexp(-1).sum(), images)[0]


def _check_model(model, sae, images, min_change):
    clean = model(images)
    with spliced(model, sae, use_error=True):
        unedited = model(images)
        ablated = model.run_with_hooks(images, fwd_hooks=[(f"{sae.cfg.hook_name}.hook_sae_acts_post", _zero)])
        x = images.clone().requires_grad_(True)
        grad = torch.autograd.grad(model(x).logsumexp(-1).sum(), x)[0]
    torch.testing.assert_close(unedited, clean, rtol=1e-5, atol=1e-5)
    reference = _ablation_reference(model, sae, images)
    torch.testing.assert_close(ablated, reference, rtol=1e-5, atol=1e-5)
    change = float((ablated - clean).detach().abs().max())
    assert change > min_change  # the edit reaches the logits
    torch.testing.assert_close(grad, _gradient_reference(model, sae, images), rtol=1e-5, atol=1e-6)
    x = images.clone().requires_grad_(True)
    clean_grad = torch.autograd.grad(model(x).logsumexp(-1).sum(), x)[0]
    return change, float(grad.norm() / clean_grad.norm())


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk", "gated"])
def test_ablation_and_gradients_follow_saelens_convention(arch):
    change, ratio = _check_model(_model(), _sae(arch=arch), torch.randn(3, 3, 16, 16), min_change=1e-2)
    assert ratio != pytest.approx(1.0, abs=1e-3)


def test_embedded_default_notebook_case():
    """The notebook's setting: the embedded default at blocks.4.hook_resid_post."""
    from circuits.runs.sources import load_model
    from circuits.embedded import SyntheticShapes, normalize

    model = load_model("embedded")
    data = SyntheticShapes(4, seed=0, split="test", transform=normalize)
    images = torch.stack([data[i]["image"] for i in range(4)])
    sae = _sae("blocks.4.hook_resid_post", d=64, arch="topk")
    change, ratio = _check_model(model, sae, images, min_change=0.1)
    assert 0 < ratio < 10


def test_hook_names_and_several_saes_at_once():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    a, b = _sae("blocks.0.hook_resid_post"), _sae(HOOK, arch="topk", seed=3)
    tc = _sae("blocks.0.ln2.hook_normalized", arch="relu", hook_out="blocks.0.hook_mlp_out", seed=4)
    ref = model(x)
    logits, cache = model.run_with_cache_with_saes(x, saes=[a, b, tc], use_error_term=True)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for hook in ("blocks.0.hook_resid_post", HOOK, "blocks.0.hook_mlp_out"):
        assert all(f"{hook}.{n}" in cache for n in NAMES) and hook in cache  # the original name too
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out.hook_sae_input"], cache["blocks.0.ln2.hook_normalized"])
    assert model.acts_to_saes == {} and "blocks.0.hook_resid_post.hook_sae_acts_post" not in model.hook_dict
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    no_error = model.run_with_saes(x, saes=[b])  # use_error_term from the dictionary: off
    assert (no_error - ref).abs().max() > 1e-3


def test_add_reset_and_restore():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    a, a2 = _sae(seed=1), _sae(seed=7)
    ref = model(x)
    model.add_sae(a)
    with_a = model(x)
    with model.saes([a2], use_error_term=True):  # displaces a for the block
        assert model.acts_to_saes[HOOK] is a2
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert model.acts_to_saes[HOOK] is a
    torch.testing.assert_close(model(x), with_a)
    model.reset_saes()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no dictionary is spliced"):
        model.reset_saes(HOOK)
    with pytest.raises(ValueError, match="not a hook point"):
        model.add_sae(_sae("blocks.9.hook_resid_post"))


def test_transcoder_error_term_keeps_feature_edits():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    tc = _sae("blocks.0.ln2.hook_normalized", arch="topk", hook_out="blocks.0.hook_mlp_out", skip=True)
    _, clean = model.run_with_cache(x)
    splice = attach_dictionary(model, tc, use_error=True)
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.0.hook_mlp_out"))
    ablated = model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_mlp_out.hook_sae_acts_post", _zero)],
                                   return_type="resid")
    detach_dictionary(model, "blocks.0.hook_mlp_out")
    src = clean["blocks.0.ln2.hook_normalized"]
    pred = tc.decode(tc.encode(src)) + tc.skip_term(src)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out.hook_sae_error"], clean["blocks.0.hook_mlp_out"] - pred)
    want = tc.b_dec + tc.skip_term(src) + (clean["blocks.0.hook_mlp_out"] - pred)
    edited = model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, hook: want.detach())],
                                  return_type="resid")
    torch.testing.assert_close(ablated, edited, rtol=1e-5, atol=1e-5)
    assert splice.sae is tc and "blocks.0.hook_mlp_out.hook_sae_acts_post" not in model.hook_dict


def test_dtype_of_the_dictionary_is_kept_inside_and_cast_at_the_boundary():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    sae = _sae(dtype="bfloat16")
    logits, cache = model.run_with_cache_with_saes(x, saes=[sae], use_error_term=False)
    assert cache[f"{HOOK}.hook_sae_acts_post"].dtype == torch.bfloat16 and cache[HOOK].dtype == torch.float32
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("case", ["standard", "skip_transcoder"])
def test_splice_matches_hooked_sae_transformer_fixture(case):
    """HookedSAETransformer's own splice (_SAEWrapper, use_error_term=True), stored by
    make_fixtures.py: same output, features zeroed or not. Gradients wrt the dictionary's
    input agree for the SAE; for a skip transcoder SAELens's splice leaves W_skip out of the
    reconstruction (it sits in the gradient-free error), ours keeps it on the gradient path."""
    from hooked_vit.saes import SpliceHook
    from transformer_lens.hook_points import HookPoint

    want = load_file(FIX / "wrapper_term.safetensors")
    sae = load_saelens(FIX / "theirs" / case)
    hook_in, hook_out = ("a", "a") if case == "standard" else ("a", "b")
    for tag in ("ablated", "unedited"):
        splice = SpliceHook(sae, HookPoint(), hook_in, hook_out, use_error_term=True)
        if tag == "ablated":
            splice.hook_sae_acts_post.add_hook(_zero)
        src = want[f"{case}.src"].clone().requires_grad_(True)
        if case == "standard":
            y = splice(src)
        else:
            splice.captured = src
            y = splice(want[f"{case}.orig"])
        splice.hook_sae_acts_post.remove_hooks()
        torch.testing.assert_close(y, want[f"{case}.{tag}"], rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad((y * want[f"{case}.w"]).sum(), src, allow_unused=True)
        grad = torch.zeros_like(src) if grad is None else grad
        if case == "standard":
            torch.testing.assert_close(grad, want[f"{case}.{tag}.grad_src"], rtol=1e-5, atol=1e-5)
        else:  # ours = SAELens's + the skip path's gradient
            torch.testing.assert_close(grad, want[f"{case}.{tag}.grad_src"] + want[f"{case}.w"] @ sae.W_skip.detach(),
                                       rtol=1e-5, atol=1e-5)
