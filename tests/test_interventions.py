"""Attention perturbations: self_only, no_cls, edge masks, and the dataset-level experiment."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from circuits.interventions import (
    attention_edge_mask,
    no_cls,
    perturbation_hooks,
    self_only,
    summarize_rates,
)
from circuits.projection import project_batch
from circuits.runs.perturb import perturbation_experiment, perturbation_rates
from circuits.runs.results import read_manifest
from helpers import images, make_timm
from hooked_vit import HookedViT

# A class-token ViT, a register model with LayerScale (DINOv2 reg4), a distilled DeiT.
FAMILIES = ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2", "deit_tiny_distilled_patch16_224"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    timm_model, size = make_timm(request.param)
    return HookedViT.from_timm(timm_model), images(size, 2)


def run_capturing(model, x, hooks, names):
    """Run with `hooks`, then record the (edited) activations at `names`: a hook added after
    another on the same point sees what the first returned."""
    store = {}
    record = [(n, lambda act, hook: store.__setitem__(hook.name, act.detach().clone())) for n in names]
    logits = model.run_with_hooks(x, fwd_hooks=list(hooks) + record)
    return logits, store


def test_self_only_gives_each_image_token_its_own_value_through_W_O(setup):
    model, x = setup
    n_prefix, L = model.cfg.n_prefix_tokens, model.cfg.n_layers
    names = [f"blocks.{l}.{h}" for l in range(L) for h in ("attn.hook_v", "hook_attn_out", "attn.hook_pattern")]
    _, cache = run_capturing(model, x, perturbation_hooks(model, "self_only"), names)
    for l in range(L):
        attn = model.blocks[l].attn
        v, out = cache[f"blocks.{l}.attn.hook_v"], cache[f"blocks.{l}.hook_attn_out"]
        expected = torch.einsum("bphe,hem->bpm", v, attn.W_O) + attn.b_O  # z[t] = v[t]
        torch.testing.assert_close(out[:, n_prefix:], expected[:, n_prefix:], atol=1e-5, rtol=1e-5)
        # the prefix rows (class, registers, distillation) do not reduce to their own value
        assert not torch.allclose(out[:, :n_prefix], expected[:, :n_prefix], atol=1e-3)
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]
        eye = torch.eye(pattern.shape[-1])[n_prefix:]
        assert torch.equal(pattern[:, :, n_prefix:], eye.expand_as(pattern[:, :, n_prefix:]))


def test_self_only_leaves_prefix_rows_unless_asked(setup):
    model, x = setup
    name = "blocks.0.attn.hook_pattern"
    _, clean = run_capturing(model, x, [], [name])
    _, default = run_capturing(model, x, [(name, self_only(model))], [name])
    _, all_rows = run_capturing(model, x, [(name, self_only(model, perturb_prefix_queries=True))], [name])
    n_prefix = model.cfg.n_prefix_tokens
    # block 0 sees the same input in every run, so unperturbed rows must match exactly
    assert torch.equal(default[name][:, :, :n_prefix], clean[name][:, :, :n_prefix])
    assert torch.equal(all_rows[name][:, :, 0], clean[name][:, :, 0])  # the class row, always
    if n_prefix > 1:  # registers / distillation token: one-hot only with perturb_prefix_queries
        p = clean[name].shape[-1]
        eye = torch.eye(p)[1:n_prefix].expand_as(all_rows[name][:, :, 1:n_prefix])
        assert torch.equal(all_rows[name][:, :, 1:n_prefix], eye)
        assert not torch.equal(default[name][:, :, 1:n_prefix], eye)


def test_no_cls_zeroes_the_class_key_for_image_queries_only(setup):
    model, x = setup
    n_prefix = model.cfg.n_prefix_tokens
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, clean = run_capturing(model, x, [], names)
    logits, cut = run_capturing(model, x, perturbation_hooks(model, "no_cls"), names)
    for name in names:
        assert torch.all(cut[name][:, :, n_prefix:, 0] == 0)
        assert torch.all(cut[name][:, :, n_prefix:, 1:] > 0)  # nothing else removed
    first = names[0]  # same input in block 0: compare with the unperturbed pattern directly
    expected = clean[first].clone()
    expected[:, :, n_prefix:, 0] = 0  # no renormalisation: other weights keep their values
    assert torch.equal(cut[first], expected)
    assert torch.equal(cut[first][:, :, 0], clean[first][:, :, 0])  # class row untouched
    assert not torch.allclose(logits, model(x))


def test_no_cls_prefix_keys_and_models_without_a_class_token():
    timm_model, size = make_timm("vit_base_patch16_reg4_gap_256")
    model = HookedViT.from_timm(timm_model)
    assert not model.cfg.class_token and model.cfg.n_prefix_tokens == 4
    with pytest.raises(ValueError, match="no class token"):
        no_cls(model)
    name = "blocks.1.attn.hook_pattern"
    _, cut = run_capturing(model, images(size, 2), [(name, no_cls(model, keys="prefix"))], [name])
    assert torch.all(cut[name][:, :, 4:, :4] == 0) and torch.all(cut[name][:, :, :4, :4] > 0)


def test_layers_and_heads_select_where_the_edit_happens():
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model, x = HookedViT.from_timm(timm_model), images(size, 2)
    hooks = perturbation_hooks(model, "self_only", layers=[-1])
    assert [n for n, _ in hooks] == [f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"]
    assert perturbation_hooks(model, "none") == []
    name = "blocks.0.attn.hook_pattern"
    _, clean = run_capturing(model, x, [], [name])
    _, cut = run_capturing(model, x, [(name, no_cls(model, heads=[1]))], [name])
    assert torch.all(cut[name][:, 1, 1:, 0] == 0)
    for h in (0, 2, 3):
        assert torch.equal(cut[name][:, h], clean[name][:, h])


def test_edge_mask_per_image():
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model, x = HookedViT.from_timm(timm_model), images(size, 2)
    p = model.cfg.n_ctx
    queries = torch.zeros(2, p, dtype=torch.bool)
    queries[0, 3:6] = True  # only image 0 has edited rows
    hook = attention_edge_mask(queries, [0, 2])
    name = "blocks.0.attn.hook_pattern"
    logits, cut = run_capturing(model, x, [(name, hook)], [name])
    _, clean = run_capturing(model, x, [], [name])
    expected = clean[name].clone()
    expected[0, :, 3:6][..., [0, 2]] = 0
    assert torch.equal(cut[name], expected)
    ref = model(x)
    torch.testing.assert_close(logits[1], ref[1])
    assert not torch.allclose(logits[0], ref[0])
    # bool masks, slices and index lists describe the same edges
    same = attention_edge_mask(slice(3, 6), torch.arange(p) % 2 == 0)
    alt = attention_edge_mask([3, 4, 5], [i for i in range(p) if i % 2 == 0])
    pattern = clean[name]
    assert torch.equal(same(pattern), alt(pattern))


class Tiny(Dataset):
    def __init__(self, n=6, size=48):
        self.n, self.size = n, size

    def describe(self):
        return f"Tiny({self.n})"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, self.size, self.size, generator=gen), "label": i % 10, "index": i}


def test_perturbation_experiment_matches_direct_projection(tmp_path):
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model = HookedViT.from_timm(timm_model)
    data = Tiny(6, size)
    runs = perturbation_experiment(model, data, tmp_path, layers=[1], batch_size=4, progress=False)
    assert set(runs) == {"none", "self_only", "no_cls"}
    settings = read_manifest(runs["self_only"])["settings"]
    assert settings["analysis"] == "attention_perturbation" and settings["perturbation"] == "self_only"
    assert settings["layers"] == [1]
    df = perturbation_rates(runs)
    assert len(df) == 18
    x = torch.stack([data[i]["image"] for i in range(6)])
    y = torch.tensor([data[i]["label"] for i in range(6)])
    for kind in runs:
        proj = project_batch(model, x, y, sites=("block",), fwd_hooks=perturbation_hooks(model, kind, [1]))
        expected = (proj.rank[:, 0, -1, 1:] == 0).float().mean(1).numpy()
        got = df[df["kind"] == kind].sort_values("index")["identifiable_token_rate"].to_numpy()
        assert got == pytest.approx(expected)
    summary = summarize_rates(df)
    assert list(summary["kind"]) == ["none", "self_only", "no_cls"] and (summary["images"] == 6).all()
    # A rerun resumes (nothing to do) and a rerun with other layers refuses to mix results.
    perturbation_experiment(model, data, tmp_path, layers=[1], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        perturbation_experiment(model, data, tmp_path, kinds=["self_only"], layers=[0], progress=False)


def test_cli_perturb_and_report_section(tmp_path):
    """`hooked-vit perturb` on a local checkpoint and the synthetic data, then the report."""
    import timm
    from safetensors.torch import save_file

    from circuits.cli import main
    from circuits.report import build_report
    from helpers import randomize_

    arch = "vit_tiny_patch16_224:img_size=32,patch_size=4,depth=2,embed_dim=48,num_heads=4"
    timm_model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=48,
                                   num_heads=4, num_classes=10)
    save_file(randomize_(timm_model.eval(), std=0.1).state_dict(), str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "out"
    code = main(["perturb", "--model", str(tmp_path / "tiny.safetensors"), "--arch", arch, "--data",
                 "synthetic:test:8", "--out", str(out), "--batch-size", "4", "--kinds", "self_only",
                 "--layers", "-1"])
    assert code == 0
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["none", "self_only"]
    assert read_manifest(out / "attention" / "self_only")["settings"]["layers"] == [1]
    page = build_report([out], tmp_path / "report.html").read_text()
    assert "Attention perturbation (Vilas et al. 2023)" in page and "Token removal (Vilas et al. 2023)" in page
    assert page.count("<table>") == 2 and "self_only" in page and "class_label" in page
