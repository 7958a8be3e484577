"""Evaluations of explanation maps (circuits.explain.evaluate / benchmark): metric
functions on masks with known answers, perturbation tests on a model whose prediction
reads one patch, the randomisation sanity check, and the resumable dataset benchmark."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch.utils.data import Dataset

from circuits.explain import (auc, average_precision, explain, explain_many, keep_auc, perturbation_curve,
                              randomization_check, relevance_order, segmentation_counts, segmentation_scores)
from circuits.runs.explain import benchmark, load_maps, summarize_benchmark
from helpers import randomize_
from hooked_vit import HookedViT
from test_explain_methods import K_STAR, one_patch_images, one_patch_model


# ----------------------------------------------------------------------------- metrics
def test_average_precision_known_answers():
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(
        (1 + 2 / 3) / 2)
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)  # a tie
    assert average_precision(torch.tensor([0.1, 0.9]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert np.isnan(average_precision(torch.tensor([0.1, 0.9]), torch.tensor([0, 0])))


def test_segmentation_scores_on_masks_with_known_answers():
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True  # left half is the object
    maps = torch.zeros(3, 8, 8)
    maps[0] = mask[0].float()  # perfect
    maps[1] = (~mask[1]).float()  # inverted
    maps[2, :, :2] = 1.0  # left quarter only: above the mean (0.25) there
    counts = segmentation_counts(maps, mask)
    per_image = [segmentation_scores({k: v[i : i + 1] for k, v in counts.items()}) for i in range(3)]
    assert per_image[0] == pytest.approx({"pixel_accuracy": 1.0, "miou": 1.0, "map": 1.0})
    assert per_image[1]["pixel_accuracy"] == 0 and per_image[1]["miou"] == 0
    assert per_image[1]["map"] == pytest.approx(0.5)  # every positive ranked last: AP = prevalence
    # quarter vs half: accuracy 3/4, IoU fg 1/2, IoU bg (1/2) / (3/4)
    assert per_image[2]["pixel_accuracy"] == pytest.approx(0.75)
    assert per_image[2]["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    # Dataset level: counts are summed before dividing, APs averaged.
    total = segmentation_scores(counts)
    assert total["pixel_accuracy"] == pytest.approx((64 + 0 + 48) / 192)
    inter_fg, union_fg = 32 + 0 + 16, 32 + 64 + 32
    inter_bg, union_bg = 32 + 0 + 32, 32 + 64 + 48
    assert total["miou"] == pytest.approx((inter_fg / union_fg + inter_bg / union_bg) / 2)
    assert total["map"] == pytest.approx(np.mean(counts["ap"]))


def test_auc_definitions():
    fractions = [0.0, 0.1, 0.2]
    assert auc([1.0, 0.0, 0.0], fractions) == pytest.approx(0.05 / 0.2)
    assert auc([0.5, 0.5, 0.5], fractions) == pytest.approx(0.5)
    assert keep_auc([0.8, 0.4]) == pytest.approx(1.2 / (0.8 * 2))
    assert keep_auc([0.0, 0.0]) == 0.0


def test_relevance_order_breaks_ties_at_random_but_reproducibly():
    rel = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert relevance_order(rel, "positive").tolist() == [[1, 3, 2, 0]]
    assert relevance_order(rel, "negative").tolist() == [[0, 2, 3, 1]]
    flat = torch.zeros(1, 64)
    a, b = relevance_order(flat, seed=1), relevance_order(flat, seed=1)
    assert torch.equal(a, b) and not torch.equal(a[0], torch.arange(64))  # not the raster order


# ----------------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("mode", ["remove", "zero"])
def test_positive_perturbation_drops_accuracy_at_the_first_step(mode):
    model, x = one_patch_model(), one_patch_images(batch=3)
    labels = torch.ones(3, dtype=torch.long)
    for method in ("gae", "tokentm", "class_embedding", "gradcam"):
        rel = explain(method, model, x, labels)
        pos = perturbation_curve(model, x, labels, rel, order="positive", mode=mode).float().mean(0)
        neg = perturbation_curve(model, x, labels, rel, order="negative", mode=mode).float().mean(0)
        assert pos[0] == 1 and (pos[1:] == 0).all(), (method, pos)
        assert (neg == 1).all(), (method, neg)
    # A map that ranks the read patch last keeps the prediction under positive perturbation.
    rel = torch.ones(3, 16)
    rel[:, K_STAR] = -1
    assert perturbation_curve(model, x, labels, rel, order="positive", mode=mode).all()


def test_unperturbed_steps_reuse_the_given_correctness():
    model, x = one_patch_model(), one_patch_images(batch=2)
    labels = torch.ones(2, dtype=torch.long)
    rel = explain("gae", model, x, labels)
    fake = torch.tensor([False, True])  # differs from the truth: shows it is reused at step 0 only
    curve = perturbation_curve(model, x, labels, rel, order="negative", unperturbed=fake)
    assert curve[:, 0].tolist() == [False, True] and curve[:, 1:].all()


# ----------------------------------------------------------------------------- sanity check
def test_randomisation_check_decorrelates_maps():
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=3,
                                   embed_dim=48, num_heads=4, num_classes=10)
    model = HookedViT.from_timm(randomize_(timm_model.eval(), seed=2, std=0.2))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 2, 3, 4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    methods = ("rollout", "gae", "class_embedding", "tokentm")
    rows = pd.DataFrame(randomization_check(model, x, targets, methods))
    assert list(rows[rows.method == "gae"].stage) == ["original", "head", "block 2", "block 1", "block 0"]
    for m in methods:
        r = rows[rows.method == m].set_index("step")["spearman"]
        assert r[0] == 1.0 and r.iloc[-1] < 0.5, (m, r.tolist())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    # Re-running the check on the same model gives the same numbers (seeded).
    again = pd.DataFrame(randomization_check(model, x, targets, ("gae",)))
    np.testing.assert_allclose(again.spearman, rows[rows.method == "gae"].spearman)


# ----------------------------------------------------------------------------- benchmark
class OnePatchData(Dataset):
    """Images of the hand-built model; the object mask is the read patch."""

    def __init__(self, n: int = 6):
        self.x = one_patch_images(batch=n, seed=3)
        self.mask = torch.zeros(16, 16, dtype=torch.bool)
        r, c = divmod(K_STAR, 4)
        self.mask[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = True

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": 1, "index": i, "path": "", "mask": self.mask}


def test_benchmark_table_resume_and_gradient_methods_beat_random(tmp_path):
    model, data = one_patch_model(), OnePatchData(6)
    methods = ["gae", "tokentm", "rollout", "random"]
    out = tmp_path / "run"
    store = benchmark(model, data, out, methods, batch_size=4, thumbnails=2, sanity_images=2, progress=False)
    assert store.done == set(range(6))
    table = summarize_benchmark(out).set_index("method")
    assert list(table.index) == methods
    for m in ("gae", "tokentm"):
        assert table.loc[m, "positive_auc"] < table.loc["random", "positive_auc"]
        assert table.loc[m, "negative_auc"] == 1.0 > table.loc["random", "negative_auc"]
        assert table.loc[m, "keep_auc_most"] == 1.0
        assert table.loc[m, "map"] > 0.9 and table.loc[m, "miou"] > table.loc["random", "miou"]
    assert table.loc["gae", "positive_curve"][0] == 1.0  # step 0: the unperturbed model's accuracy
    # Tables load with pandas; the maps are the ones `explain` gives.
    maps = load_maps(out)
    torch.testing.assert_close(torch.from_numpy(maps["gae"]), explain("gae", model, data.x, torch.ones(6, dtype=torch.long)))
    thumbs = pd.read_parquet(out / "thumbnails")
    assert sorted(thumbs["index"]) == [0, 1] and len(thumbs["pixels"][0]) == 16 * 16 * 3
    assert json.loads((out / "summary.json").read_text())[0]["method"] == "gae"
    assert {r["stage"] for r in json.loads((out / "sanity.json").read_text())} >= {"original", "block 0"}
    # A rerun resumes (nothing left to do); other settings are refused.
    parts = sorted(p.name for p in (out / "maps").glob("*.parquet"))
    benchmark(model, data, out, methods, batch_size=4, thumbnails=2, sanity_images=2, progress=False)
    assert sorted(p.name for p in (out / "maps").glob("*.parquet")) == parts
    with pytest.raises(ValueError, match="other settings"):
        benchmark(model, data, out, ["gae"], batch_size=4, progress=False)


def test_benchmark_explains_the_predicted_class_on_request(tmp_path):
    model, data = one_patch_model(), OnePatchData(2)
    benchmark(model, data, tmp_path / "run", ["gae"], target="predicted", progress=False, thumbnails=0)
    images = pd.read_parquet(tmp_path / "run" / "images")
    assert (images["target"] == images["pred"]).all()
    maps = explain_many(model, data.x, None, ["gae"])["gae"]
    torch.testing.assert_close(torch.from_numpy(load_maps(tmp_path / "run")["gae"]), maps)


def test_command_line_and_report_section(tmp_path, capsys):
    from safetensors.torch import save_file

    from circuits.cli import main
    from circuits.report import explain as section

    arch = "vit_tiny_patch16_224:img_size=32,patch_size=8,depth=1,embed_dim=16,num_heads=2,num_classes=10"
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                                   embed_dim=16, num_heads=2, num_classes=10)
    save_file(randomize_(timm_model).state_dict(), str(tmp_path / "m.safetensors"))
    out = tmp_path / "run"
    code = main(["explain", "--model", str(tmp_path / "m.safetensors"), "--arch", arch, "--data", "synthetic:test:6",
                 "--out", str(out), "--methods", "gae", "tokentm:grad=none", "random", "--batch-size", "4",
                 "--sanity-images", "2", "--thumbnails", "2", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tokentm:grad=none" in printed and "positive_auc" in printed
    html = "".join(section.report_section({"cli run": out}))
    for text in ("cli run: benchmark", "mIoU", "tokentm:grad=none", "relevance maps", "randomisation"):
        assert text in html, text
    assert main(["explain", "--out", str(tmp_path / "x"), "--methods", "saliency"]) == 2
    assert "unknown explanation method 'saliency'" in capsys.readouterr().err
