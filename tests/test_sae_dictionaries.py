"""Dictionaries: TopK recovers a planted sparse dictionary; every architecture trains and
splices; the error term keeps logits unchanged; SAELens / ViT-Prisma files load."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from circuits.sae.dictionaries import ARCHITECTURES, DictionaryConfig, SparseDictionary
from circuits.sae.formats import load_dictionary, load_saelens, load_vit_prisma, save_saelens
from circuits.sae.splice import attach_dictionary, detach_dictionary, spliced
from circuits.sae.train import TrainConfig, geometric_median, train_dictionary
from hooked_vit import HookedViT
from helpers import randomize_

HOOK = "blocks.1.hook_resid_post"


def _model():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, num_classes=5)
    return HookedViT.from_timm(randomize_(vit.eval(), seed=5))


def _planted(n_atoms=64, d=32, k=3, n=40_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=gen).topk(k, dim=1).indices
    coef = torch.zeros(n, n_atoms).scatter(1, idx, 0.5 + torch.rand(n, k, generator=gen))
    return atoms, coef @ atoms


def test_topk_recovers_planted_atoms():
    atoms, x = _planted()
    sae = SparseDictionary(DictionaryConfig(32, 128, "topk", k=3, hook_name="x"), seed=1)

    def batches(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        return ({"x": x[perm[i:i + 256]]} for i in range(0, len(x) - 255, 256))

    train_dictionary(sae, batches, TrainConfig(steps=1500, lr=3e-3, warmup_steps=50, dead_after_tokens=5000),
                     progress=False)
    cos = atoms @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T.detach()
    assert cos.max(1).values.mean() > 0.9


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_and_reduces_loss(arch):
    _, x = _planted(n=4096)
    sae = SparseDictionary(DictionaryConfig(32, 64, arch, k=4, hook_name="x"))
    log = train_dictionary(sae, lambda e: ({"x": x[i:i + 256]} for i in range(0, 4096, 256)),
                           TrainConfig(steps=120, lr=3e-3, warmup_steps=10, sparsity_coeff=1e-3, resample_every=50,
                                       dead_after_tokens=2048), progress=False)
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # decoder-norm constraint
    if arch in ("topk", "batchtopk"):
        assert 0 < sae.encode(x[:512]).gt(0).float().sum(-1).mean() <= 4 * 1.5


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(99, 3) * 0.1, torch.full((1, 3), 1000.0)])
    assert geometric_median(x).abs().max() < 0.2 < x.mean(0).abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_splice_with_error_leaves_logits_unchanged(arch):
    model, x = _model(), torch.randn(3, 3, 16, 16)
    sae = SparseDictionary(DictionaryConfig(32, 96, arch, k=5, hook_name=HOOK), seed=2)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    ref = model(x)
    with spliced(model, sae, use_error=True):
        logits, cache = model.run_with_cache(x)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        acts = cache[f"{HOOK}.hook_sae_acts_post"]
        assert acts.shape == (3, 17, 96)
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"] + cache[f"{HOOK}.hook_sae_error"],
                                   cache[f"{HOOK}.hook_sae_input"])
        no_error = model.hook_dict[HOOK]
        no_error.use_error_term = False
        assert (model(x) - ref).abs().max() > 1e-3  # without the error term the SAE's imperfection shows
    assert f"{HOOK}.hook_sae_acts_post" not in model.hook_dict
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_patching_a_feature_through_run_with_hooks():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    sae = SparseDictionary(DictionaryConfig(32, 64, "relu", hook_name=HOOK), seed=0)
    attach_dictionary(model, sae, use_error=False)
    ref = model(x)
    out = model.run_with_hooks(x, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", lambda a, hook: a * 0)])
    assert not torch.allclose(out, ref)
    # every feature ablated: the block's output is b_dec at every token
    torch.testing.assert_close(out, model.unembed(model.pool(sae.b_dec.expand(2, 17, 32).detach())))
    detach_dictionary(model, HOOK)
    with pytest.raises(ValueError, match="no dictionary"):
        detach_dictionary(model, HOOK)


def test_transcoder_splice():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    tc = SparseDictionary(DictionaryConfig(32, 64, "topk", k=4, hook_name="blocks.0.ln2.hook_normalized",
                                           hook_out="blocks.0.hook_mlp_out"))
    ref = model(x)
    with spliced(model, tc):
        logits, cache = model.run_with_cache(x)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache["blocks.0.hook_mlp_out.hook_sae_input"], cache["blocks.0.ln2.hook_normalized"])
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_roundtrip(tmp_path, arch):
    sae = SparseDictionary(DictionaryConfig(16, 40, arch, k=3, hook_name=HOOK, tokens="patch"), seed=4)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        sae.batch_threshold.fill_(0.05)
    save_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert {"d_in", "d_sae", "architecture", "hook_name", "hook_layer"} <= set(cfg) and cfg["hook_layer"] == 1
    back = load_dictionary(tmp_path)
    assert back.cfg.architecture == arch and back.cfg.tokens == "patch"
    x = torch.randn(20, 16) * 3
    sae.eval()
    torch.testing.assert_close(back(x), sae(x))


def _hand_built(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def test_hand_built_saelens_fixture_loads(tmp_path):
    gen = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(8, 24, generator=gen), "b_enc": torch.randn(24, generator=gen),
         "W_dec": torch.randn(24, 8, generator=gen), "b_dec": torch.randn(8, generator=gen)}
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 24, "hook_name": "blocks.0.hook_resid_pre",
           "hook_layer": 0, "activation_fn_str": "relu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "dtype": "float32", "model_name": "gpt2"}
    _hand_built(tmp_path / "relu", cfg, t)
    sae = load_saelens(tmp_path / "relu")
    x = torch.randn(5, 8, generator=gen)
    want = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(sae(x), want)
    _hand_built(tmp_path / "jump", {**cfg, "architecture": "jumprelu"}, {**t, "threshold": torch.full((24,), 0.7)})
    z = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    torch.testing.assert_close(load_saelens(tmp_path / "jump").encode(x), z * (z > 0.7))
    _hand_built(tmp_path / "topk", {**cfg, "architecture": "topk", "k": 2}, t)
    assert load_saelens(tmp_path / "topk").encode(x).gt(0).sum(-1).max() <= 2
    _hand_built(tmp_path / "topk_no_k", {**cfg, "architecture": "topk"}, t)
    with pytest.raises(ValueError, match="gives no k"):  # never a silent top-1
        load_saelens(tmp_path / "topk_no_k")
    _hand_built(tmp_path / "bad", {**cfg, "d_sae": 25}, t)
    with pytest.raises(ValueError, match="W_enc is"):
        load_saelens(tmp_path / "bad")
    _hand_built(tmp_path / "temporal", {**cfg, "architecture": "temporal"}, t)
    with pytest.raises(ValueError, match="architecture 'temporal' is not supported"):
        load_saelens(tmp_path / "temporal")


def test_vit_prisma_folder_loads_and_pickles_are_refused(tmp_path):
    t = {"W_enc": torch.randn(8, 32), "b_enc": torch.randn(32), "W_dec": torch.randn(32, 8), "b_dec": torch.randn(8)}
    (tmp_path / "config.json").write_text(json.dumps({"d_in": 8, "expansion_factor": 4, "hook_point":
                                                      "blocks.3.hook_mlp_out", "hook_point_layer": 3,
                                                      "activation_fn_str": "relu"}))
    save_file(t, str(tmp_path / "weights.safetensors"))
    sae = load_vit_prisma(tmp_path)
    assert sae.cfg.d_sae == 32 and sae.cfg.hook_name == "blocks.3.hook_mlp_out"
    (tmp_path / "weights.safetensors").unlink()
    (tmp_path / "n_images_100.pt").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickles are never loaded"):
        load_dictionary(tmp_path)
