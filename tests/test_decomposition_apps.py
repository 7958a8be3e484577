"""Alignment, scoring, retrieval, heatmaps and spurious-feature removal."""

from __future__ import annotations

import sys

import pytest
import torch

from circuits.decomposition.align import (
    ComponentMaps, fit_alignment, identity_maps, load_open_clip, orthogonality_penalty,
)
from circuits.decomposition.decompose import decompose
from circuits.decomposition.scoring import (
    FeatureScorer, component_scores, feature_retrieval, image_retrieval, orthonormal_basis, project,
    token_heatmaps, top_components,
)
from circuits.decomposition.spurious import feature_basis, group_accuracy, mean_ablate
from helpers import images, make_timm
from hooked_vit import HookedViT


def test_alignment_recovers_a_planted_orthogonal_map():
    torch.manual_seed(0)
    n_comp, d, n = 3, 6, 256
    planted = torch.linalg.qr(torch.randn(n_comp, d, d)).Q  # one isometry per component
    terms = torch.randn(n, n_comp, d)
    targets = torch.einsum("nci,coi->no", terms, planted)
    result = fit_alignment(terms, targets, steps=120, lr=3e-2, progress=False, seed=1)
    err = (result.maps.weight - planted).norm(dim=(1, 2)) / planted.norm(dim=(1, 2))
    assert err.max() < 1e-2, err
    assert result.cosine > 0.999
    # Components map with their own map, and the mapped sum points at the target.
    mapped = result.maps(terms).sum(1)
    assert torch.nn.functional.cosine_similarity(mapped, targets).min() > 0.999
    # Starting point was far from the answer: the optimisation did the work.
    start = ComponentMaps(n_comp, d, d, init="orthogonal", seed=1).weight
    assert ((start - planted).norm(dim=(1, 2)) / planted.norm(dim=(1, 2))).min() > 0.5


def test_orthogonality_penalty_and_identity_maps():
    q = torch.linalg.qr(torch.randn(2, 5, 5)).Q
    assert orthogonality_penalty(q) < 1e-10
    assert orthogonality_penalty(2 * q) > 1.0
    assert orthogonality_penalty(q[:, :3, :]) < 1e-10  # narrowing map: W W^T = I
    terms = torch.randn(4, 7, 5)
    assert torch.equal(identity_maps(7, 5)(terms), terms)


def test_open_clip_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match="open_clip"):
        load_open_clip()


def planted_feature(n=300, n_comp=6, d=16, planted=3, seed=0):
    """Components of noise, one of which carries a 2-d feature: (terms, basis, signal).

    The other components are louder overall but vary little along the feature (as most
    heads do for any one feature), so the feature's variation in the total flows through
    the planted component."""
    gen = torch.Generator().manual_seed(seed)
    basis = orthonormal_basis(torch.randn(2, d, generator=gen))
    signal = torch.randn(n, 2, generator=gen)
    noise = 2.0 * torch.randn(n, n_comp, d, generator=gen)
    off_feature = noise - (noise @ basis.T) @ basis  # removed along the feature ...
    terms = off_feature + 0.3 * torch.randn(n, n_comp, 2, generator=gen) @ basis  # ... but for a little
    terms[:, planted] = 0.3 * torch.randn(n, d, generator=gen) + signal @ basis
    return terms, basis, signal


def test_planted_feature_component_ranks_first():
    terms, basis, _ = planted_feature()
    for mode in ("correlation", "covariance"):
        scores = component_scores(terms, basis, mode)
        assert top_components(scores, 1) == [3], (mode, scores)
    assert top_components(component_scores(terms, basis), 2, exclude=[3])[0] != 3


def test_covariance_scores_sum_to_variance_of_total_and_stream():
    terms, basis, _ = planted_feature(seed=3)
    s = project(terms, basis)
    scores = component_scores(terms, basis, "covariance")
    z = s.sum(1).double()
    assert scores.sum().item() == pytest.approx(z.var(0, unbiased=False).mean().item(), rel=1e-6)
    # Streaming over batches gives the same scores as one pass.
    streamed = FeatureScorer()
    for chunk in s.split(70):
        streamed.update(chunk)
    for mode in ("correlation", "covariance"):
        assert torch.allclose(streamed.scores(mode), component_scores(terms, basis, mode), atol=1e-9)
    assert streamed.variance_of_total().item() == pytest.approx(scores.sum().item(), rel=1e-6)
    corr = component_scores(terms, basis)
    assert corr.abs().max() <= 1 + 1e-9


def test_constant_components_score_zero():
    terms, basis, _ = planted_feature()
    terms[:, 0] = 5.0  # a bias-like component
    assert component_scores(terms, basis)[0] == 0


def test_retrieval_by_feature_and_by_image():
    terms, basis, signal = planted_feature(seed=1)
    order, sim = feature_retrieval(terms, [3], basis[0])
    top = signal[order[:5], 0]  # the first images retrieved carry the most of the feature
    assert top.min() > torch.quantile(signal[:, 0], 0.9)
    corr = torch.corrcoef(torch.stack([sim, signal[:, 0]]))[0, 1]
    _, sim_all = feature_retrieval(terms, range(terms.shape[1]), basis[0])
    assert corr > 0.9 and corr > torch.corrcoef(torch.stack([sim_all, signal[:, 0]]))[0, 1]
    order, cos = image_retrieval(terms, [3], terms[17])
    assert order[0] == 17 and cos[17] == pytest.approx(1.0, abs=1e-6)


def test_token_heatmaps_add_up_to_head_projections():
    timm_model, size = make_timm("vit_base_patch16_reg4_gap_256")
    model = HookedViT.from_timm(timm_model)
    x = images(size, 2)
    dec = decompose(model, x)
    direction = torch.randn(model.cfg.d_model)
    heat = token_heatmaps(model, x, dec, direction, heads_per_chunk=2)  # [b, L, H, k]
    assert heat.shape == (2, model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx)
    for layer in range(model.cfg.n_layers):
        heads = dec.flat()[:, dec.index("head", layer)] @ direction  # [b, H]
        assert torch.allclose(heat[:, layer].sum(-1), heads, atol=1e-4)
    # With aligned maps the direction is pulled back through each head's own map.
    maps = ComponentMaps(len(dec.components), model.cfg.d_model, 8, seed=2)
    direction8 = torch.randn(8)
    heat8 = token_heatmaps(model, x, dec, direction8, maps=maps, layers=[1])
    mapped = maps(dec.flat())[:, dec.index("head", 1)] @ direction8
    assert torch.allclose(heat8[:, 0].sum(-1), mapped, atol=1e-4)


def test_feature_basis_ignores_a_correlated_attribute():
    """Balanced class means: a background shift shared by most images of one class does not
    enter the class directions."""
    gen = torch.Generator().manual_seed(0)
    n, d = 400, 5
    label = torch.randint(0, 2, (n,), generator=gen)
    background = torch.where(torch.rand(n, generator=gen) < 0.9, label, 1 - label)
    x = 0.05 * torch.randn(n, d, generator=gen)
    x[:, 0] += label.float()  # class along e0
    x[:, 1] += background.float()  # background along e1
    core = feature_basis(x, label, balance=background)
    spur = feature_basis(x, background, balance=label)
    assert core.shape == (1, d) and abs(core[0, 0]) > 0.99 and abs(core[0, 1]) < 0.05
    assert abs(spur[0, 1]) > 0.99 and abs(spur[0, 0]) < 0.05


def test_group_accuracy_and_mean_ablation():
    preds, labels = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])
    acc = group_accuracy(preds, labels, torch.tensor([0, 0, 1, 1]))
    assert acc["worst_group"] == 0.5 and acc["avg_group"] == 0.75 and acc["accuracy"] == 0.75
    terms = torch.randn(5, 4, 1, 3)
    means = terms.mean(0)
    out = mean_ablate(terms, [1, 2], means)
    assert torch.allclose(out, terms[:, [0, 3]].sum(1) + means[[1, 2]].sum(0))


def test_removal_finds_a_planted_shortcut_head_and_restores_worst_group_accuracy():
    """On the embedded default (which has learned the shapes), plant a background shortcut in
    one head: worst-group accuracy collapses; removal ranks that head first and ablating
    the top components restores it."""
    from circuits.decomposition.decompose import decompose_dataset
    from circuits.decomposition.planted import plant_background_shortcut
    from circuits.runs.sources import synthetic_for
    from circuits.decomposition.spurious import fit_removal
    from circuits.runs.sources import load_model

    model = load_model("embedded")
    reference, test = synthetic_for("default", "val", 256), synthetic_for("default", "test", 256)
    hooks, planted = plant_background_shortcut(model, reference)
    ref_set = decompose_dataset(model, reference, batch_size=256, fwd_hooks=hooks, progress=False)
    test_set = decompose_dataset(model, test, batch_size=256, fwd_hooks=hooks, progress=False)
    removal = fit_removal(model, ref_set, max_k=5)
    assert removal.components[removal.order[0]].name == planted
    top = removal.order[0]
    assert removal.spurious_scores[top] > 0.7 and removal.spurious_scores[top] - removal.core_scores[top] > 0.3
    curve = removal.curve(model, test_set, max_k=5)
    before, after = curve[0], curve[removal.k]
    assert before["worst_group"] < 0.5 and after["worst_group"] > before["worst_group"] + 0.3
    assert after["avg_group"] > before["avg_group"]
    # Without the shortcut the same removal changes little: it targets the shortcut.
    clean = decompose_dataset(model, test, batch_size=256, progress=False)
    assert removal.curve(model, clean, max_k=0)[0]["worst_group"] > 0.6


def test_decompose_command_on_the_embedded_spurious_model(tmp_path):
    """The command end to end on the embedded spurious model: fit on the val split, evaluate
    on the test split (class and background independent), resume, report."""
    import json

    import numpy as np

    from circuits.cli import main
    from circuits.report.decompose import report_section
    from circuits.data import collate_samples
    from circuits.runs.sources import synthetic_for
    from circuits.runs.results import read_table
    from circuits.runs.sources import load_model

    out = tmp_path / "run"
    args = ["decompose", "--model", "embedded:spurious", "--data", "synthetic:test:256", "--reference",
            "synthetic:val:256", "--out", str(out), "--batch-size", "128", "--heatmaps", "2", "--max-k", "6"]
    assert main(args) == 0
    info = json.loads((out / "reference.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    top = info["order"][0]
    assert info["spurious_scores"][top] - info["core_scores"][top] > 0.3  # the background head comes first
    assert len(summary["curve"]) == 7 and summary["ablated"] == [info["components"][i]["name"]
                                                                 for i in info["order"][:summary["k"]]]
    # k = 0 are the model's own predictions, on the data the model was tested on (hard shapes).
    model = load_model("embedded:spurious")
    data = synthetic_for("spurious", "test", 256)
    images = read_table(out, "images")
    batch = collate_samples([data[i] for i in range(len(data))])
    with torch.no_grad():
        preds = model(batch["image"]).argmax(-1).numpy()
    assert np.array_equal(np.stack(images["pred_k"].to_numpy())[:, 0], preds)
    assert summary["before"]["accuracy"] == pytest.approx(float((preds == batch["label"].numpy()).mean()))
    # Resuming redoes nothing and changes nothing.
    parts = sorted(p.name for p in (out / "images").iterdir())
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (out / "images").iterdir()) == parts
    html = "".join(report_section({"spurious": out}))
    assert "worst_group" in html and "L" in html and html.count("plotly-graph-div") >= 3
