"""Streaming identifiability runs: results on disk, resume, unreadable images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from circuits.identifiability import summarize
from circuits.runs.identify import identify, load_results
from helpers import make_timm
from hooked_vit import HookedViT


class Shapes(Dataset):
    """Deterministic random images with a square object mask."""

    def __init__(self, n: int = 20, size: int = 48, crash_at: int | None = None):
        self.n, self.size, self.crash_at = n, size, crash_at

    def describe(self) -> str:  # equal for the crashing copy, so it resumes the same run
        return f"Shapes({self.n}, {self.size})"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        gen = torch.Generator().manual_seed(i)
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        mask[0:32, 0:32] = True  # covers the centres of the top-left 2x2 patches
        return {"image": torch.randn(3, self.size, self.size, generator=gen), "label": i % 10,
                "index": i, "path": f"img{i}", "mask": mask}


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_timm(make_timm("vit_tiny_patch16_224")[0])


def test_results_load_with_pandas_and_match_direct_projection(model, tmp_path):
    identify(model, Shapes(10), tmp_path / "run", batch_size=4, progress=False)
    images = pd.read_parquet(tmp_path / "run" / "images")
    tokens = pd.read_parquet(tmp_path / "run" / "tokens")
    assert len(images) == 10 and len(tokens) == 10 * 3 * model.cfg.n_layers
    res = load_results(tmp_path / "run")
    x = torch.stack([Shapes(10)[i]["image"] for i in range(10)])
    logits = model(x)
    assert (res.images["pred"].to_numpy() == logits.argmax(-1).numpy()).all()
    target = torch.tensor(res.images["label"].to_numpy())
    expected_rank = (logits > logits.gather(1, target[:, None])).sum(1)
    assert (res.rank[:, 0, -1, 0] == expected_rank.numpy()).all()
    assert res.object_tokens.shape == (10, 1 + 9) and res.object_tokens[0, 1:].sum() == 4  # 2x2 patches
    summary = summarize(res)
    assert 0 <= summary["identifiable_token_rate"] <= 1 and len(summary["block_change_rate"]) == 2


def test_resumed_run_equals_uninterrupted_run(model, tmp_path):
    identify(model, Shapes(20), tmp_path / "full", batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        identify(model, Shapes(20, crash_at=13), tmp_path / "resumed", batch_size=4, progress=False)
    done_before = len(list((tmp_path / "resumed" / "tokens").glob("part-*.parquet")))
    assert done_before == 3  # batches 0-3, 4-7, 8-11 finished; 12-15 was interrupted
    identify(model, Shapes(20), tmp_path / "resumed", batch_size=4, progress=False)
    for table in ("images", "tokens", "stream"):
        a = pd.read_parquet(tmp_path / "full" / table).sort_values(["index"] + (["site", "layer"] if table == "tokens" else ["layer"] if table == "stream" else [])).reset_index(drop=True)
        b = pd.read_parquet(tmp_path / "resumed" / table).sort_values(list(a.columns[:1]) + (["site", "layer"] if table == "tokens" else ["layer"] if table == "stream" else [])).reset_index(drop=True)
        assert len(a) == len(b)
        for col in a.columns:
            left, right = a[col].to_numpy(), b[col].to_numpy()
            if left.dtype == object:
                assert all(np.array_equal(x, y) for x, y in zip(left, right)), col
            else:
                assert (left == right).all(), col


def test_rerun_with_other_settings_refuses_to_mix(model, tmp_path):
    identify(model, Shapes(4), tmp_path / "run", batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        identify(model, Shapes(4), tmp_path / "run", batch_size=4, progress=False, k=3)


def test_corrupt_image_is_skipped_and_reported(model, tmp_path):
    from circuits.data import ImageFolderDataset, transform_for

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "a" / "broken.png").write_bytes(b"not an image at all")
    data = ImageFolderDataset(tmp_path / "data", transform_for(
        {"input_size": (3, 48, 48), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
         "crop_pct": 1.0, "crop_mode": "center"}))
    store = identify(model, data, tmp_path / "run", batch_size=4, progress=False)
    images = pd.read_parquet(tmp_path / "run" / "images")
    assert len(images) == 6 and len(store.done) == 7
    assert len(store.skipped) == 1 and "broken.png" in store.skipped[0]["path"]
