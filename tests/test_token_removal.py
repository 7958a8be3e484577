"""Token removal: keep-masks from object masks, compacted positions mapped back, dataset runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from circuits.projection import class_rank
from circuits.token_removal import (
    keep_mask_for,
    last_block_ranks,
    removal_batch,
    removal_rates,
    removal_summary,
    scatter_to_positions,
)
from circuits.runs.perturb import token_removal_experiment
from helpers import images, make_timm
from hooked_vit import HookedViT

# class token; registers + LayerScale; distilled; GAP with registers (pooling over kept tokens)
FAMILIES = ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2", "deit_tiny_distilled_patch16_224",
            "vit_base_patch16_reg4_gap_256"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    timm_model, size = make_timm(request.param)
    model = HookedViT.from_timm(timm_model)
    n_patch = model.cfg.n_patches
    obj = torch.zeros(3, n_patch, dtype=torch.bool)
    obj[0, :3] = True  # three different object sizes: rows of different lengths
    obj[1, 1:n_patch - 1] = True
    obj[2, 4] = True
    return model, images(size, 3), obj


def test_keep_masks_keep_prefix_and_the_chosen_kind():
    obj = torch.tensor([[True, False, True, False]])
    assert keep_mask_for(obj, "context", 2).tolist() == [[True, True, True, False, True, False]]
    assert keep_mask_for(obj, "class_label", 2).tolist() == [[True, True, False, True, False, True]]
    with pytest.raises(ValueError, match="unknown removal"):
        keep_mask_for(obj, "object", 1)


def test_scatter_to_positions_marks_removed_and_padding():
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    compact = torch.tensor([[10, 12, 13], [20, 21, 99]])  # row 1: one padding slot (99)
    out = scatter_to_positions(compact, keep, -1)
    assert out.tolist() == [[10, -1, 12, 13], [20, 21, -1, -1]]
    stacked = torch.stack([compact, compact + 100], 1)  # extra leading dims travel along
    assert scatter_to_positions(stacked, keep, -1)[:, 1].tolist() == [[110, -1, 112, 113], [120, 121, -1, -1]]


def test_removing_nothing_reproduces_the_unperturbed_run(setup):
    model, x, _ = setup
    targets = torch.tensor([1, 2, 3])
    keep = torch.ones(3, model.cfg.n_ctx, dtype=torch.bool)
    torch.testing.assert_close(model(x, keep_mask=keep), model(x), atol=1e-5, rtol=1e-5)
    rank_all, pred_all = last_block_ranks(model, x, targets, keep)
    rank, pred = last_block_ranks(model, x, targets)
    assert torch.equal(rank_all, rank) and torch.equal(pred_all, pred)


def test_a_batch_of_different_keep_masks_equals_each_image_alone(setup):
    model, x, obj = setup
    targets = torch.tensor([4, 5, 6])
    for removal in ("context", "class_label"):
        keep = keep_mask_for(obj, removal, model.cfg.n_prefix_tokens)
        logits = model(x, keep_mask=keep)
        rank, _ = last_block_ranks(model, x, targets, keep)
        for i in range(3):
            torch.testing.assert_close(logits[i:i + 1], model(x[i:i + 1], keep_mask=keep[i:i + 1]),
                                       atol=1e-4, rtol=1e-4)
            # independently of the compaction: run only the kept tokens of image i
            resid = model.embed_images(x[i:i + 1])[:, keep[i]]
            final = model(resid, start_at_layer=0, return_type="resid")
            alone = class_rank(model.to_class_logits(final), targets[i:i + 1, None])[0]
            assert torch.equal(rank[i, keep[i]], alone)
            assert torch.all(rank[i, ~keep[i]] == -1)


def test_removal_batch_rates_count_only_the_kept_kind(setup):
    model, x, obj = setup
    targets = torch.tensor([0, 1, 2])
    n_prefix = model.cfg.n_prefix_tokens
    out = removal_batch(model, x, obj, targets)
    rank_none, _ = out["none"]
    rank_ctx, _, valid = out["context"]
    assert valid.all()
    rate, rate_none = removal_rates(rank_ctx, rank_none, obj, n_prefix)
    for i in range(3):
        kept = obj[i]
        assert rate[i] == pytest.approx(float((rank_ctx[i, n_prefix:][kept] == 0).float().mean()))
        assert rate_none[i] == pytest.approx(float((rank_none[i, n_prefix:][kept] == 0).float().mean()))


class Masked(Dataset):
    """Random images with a square object; image 3 has no object (context removal invalid)."""

    def __init__(self, n=6, size=48):
        self.n, self.size = n, size

    def describe(self):
        return f"Masked({self.n})"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        if i != 3:
            mask[: 16 * (1 + i % 2), : 16 * (1 + i % 3)] = True
        return {"image": torch.randn(3, self.size, self.size, generator=gen), "label": i % 10, "index": i,
                "mask": mask}


def test_token_removal_experiment_writes_resumable_results(tmp_path):
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model = HookedViT.from_timm(timm_model)
    data = Masked(6, size)
    store = token_removal_experiment(model, data, tmp_path / "run", batch_size=4, progress=False)
    df = pd.read_parquet(tmp_path / "run" / "removal").sort_values(["index", "removal"])
    assert len(df) == 12 and set(df["removal"]) == {"context", "class_label"}
    bad = df[(df["index"] == 3) & (df["removal"] == "context")].iloc[0]
    assert not bad["valid"] and np.isnan(bad["rate_removed"])
    # per-image rows agree with a direct removal_batch on the same images
    x = torch.stack([data[i]["image"] for i in range(6)])
    obj = torch.stack([data[i]["mask"] for i in range(6)])[:, 8::16, 8::16].reshape(6, -1)
    out = removal_batch(model, x, obj, torch.tensor([data[i]["label"] for i in range(6)]))
    row = df[(df["index"] == 1) & (df["removal"] == "class_label")].iloc[0]
    assert np.array_equal(row["rank_removed"], out["class_label"][0][1].numpy())
    assert row["n_kept"] == int((~obj[1]).sum())
    summary = removal_summary(df)
    assert summary.set_index("removal").loc["context", "images"] == 5
    # resume: same settings do nothing; other removals refuse to mix
    token_removal_experiment(model, data, tmp_path / "run", batch_size=4, progress=False)
    assert len(store.read("removal")) == 12
    with pytest.raises(ValueError, match="other settings"):
        token_removal_experiment(model, data, tmp_path / "run", ["context"], progress=False)


def test_datasets_without_masks_are_refused(tmp_path):
    timm_model, size = make_timm("vit_tiny_patch16_224")
    model = HookedViT.from_timm(timm_model)

    class NoMask(Masked):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            del item["mask"]
            return item

    with pytest.raises(ValueError, match="object masks"):
        token_removal_experiment(model, NoMask(2, size), tmp_path, progress=False)
