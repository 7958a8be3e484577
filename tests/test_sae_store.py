"""Activation store: shards hold exactly run_with_cache's activations, after a kill and resume too;
memory stays flat as the dataset grows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from circuits.data import ArrayDataset
from circuits.runs.activation_store import ActivationStore, build_activation_store
from circuits.sae.activations import stream_activations
from hooked_vit import HookedViT
from helpers import randomize_

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
ROOT = Path(__file__).resolve().parents[1]


def _model(embed_dim=32):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=embed_dim, num_heads=2, num_classes=5)
    return HookedViT.from_timm(randomize_(vit.eval(), seed=3))


class _Images(torch.utils.data.Dataset):
    def __init__(self, n, fail_at=None):
        self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        self.fail_at = fail_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt("killed")
        return {"image": self.x[i], "label": i % 5, "index": i}


def _expected(model, data, batch_size):
    """run_with_cache over the same batches the store saw (float results depend on batch shape)."""
    caches = [model.run_with_cache(data.x[i:i + batch_size])[1] for i in range(0, len(data.x), batch_size)]
    return {h: torch.cat([c[h] for c in caches]) for h in HOOKS}


@pytest.mark.parametrize("tokens", ["all", "cls", "patch"])
def test_shards_match_run_with_cache_after_kill_and_resume(tmp_path, tokens):
    model = _model()
    killed = _Images(20, fail_at=13)
    with pytest.raises(KeyboardInterrupt):
        build_activation_store(model, killed, tmp_path, HOOKS, tokens=tokens, batch_size=4, progress=False)
    done = json.loads((tmp_path / "manifest.json").read_text())["done"]
    assert done == list(range(12))  # three batches of four finished before the kill
    store = build_activation_store(model, _Images(20), tmp_path, HOOKS, tokens=tokens, batch_size=4, progress=False)
    rows = store.load_all()
    cache = _expected(model, _Images(20), 4)
    n_tok = {"all": 17, "cls": 1, "patch": 16}[tokens]
    assert len(rows["token"]) == 20 * n_tok == len(store)
    pairs = set(zip(rows["image_index"].tolist(), rows["token"].tolist()))
    assert len(pairs) == 20 * n_tok  # every (image, token) exactly once
    for hook in HOOKS:
        want = cache[hook][rows["image_index"], rows["token"]]
        torch.testing.assert_close(rows[hook], want, rtol=1e-5, atol=1e-5)  # float32 precision


def test_batches_shuffle_and_cover_each_row_once(tmp_path):
    model = _model()
    store = build_activation_store(model, _Images(12), tmp_path, HOOKS, batch_size=4, progress=False)
    seen = torch.cat([b[HOOKS[0]] for b in store.batches(17, seed=1, buffer_shards=2)])
    all_rows = store.load_all()[HOOKS[0]]
    assert len(seen) == len(all_rows) // 17 * 17
    assert not torch.equal(seen, all_rows[:len(seen)])  # shuffled
    # each yielded row is one of the stored rows, none twice
    match = torch.cdist(seen, all_rows).argmin(1)
    assert len(set(match.tolist())) == len(seen)


def test_other_settings_refused(tmp_path):
    model = _model()
    build_activation_store(model, _Images(4), tmp_path, HOOKS[:1], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_activation_store(model, _Images(4), tmp_path, HOOKS, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        build_activation_store(model, _Images(4), tmp_path / "x", ["blocks.9.hook_nope"], progress=False)


def test_stream_activations_on_the_fly():
    model = _model()
    batches = list(stream_activations(model, _Images(10), HOOKS[:1], 32, image_batch=4, buffer_rows=40))
    assert batches and all(b[HOOKS[0]].shape == (32, 32) for b in batches)
    assert len(batches) * 32 <= 10 * 17


_PEAK = """
import resource, sys, torch, timm
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
from tests.test_sae_store import _model, _Images
from circuits.runs.activation_store import build_activation_store
torch.manual_seed(0)
model = _model(embed_dim=256)
build_activation_store(model, _Images({n}), {out!r}, ["blocks.1.hook_resid_post"], batch_size=16, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(n: int, out: Path) -> float:
    """Peak resident memory (MiB) of a fresh process that builds a store over n images."""
    code = _PEAK.format(root=str(ROOT), n=n, out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def test_memory_flat_as_dataset_grows(tmp_path):
    small, large = peak_rss_mib(128, tmp_path / "s"), peak_rss_mib(2560, tmp_path / "l")
    stored = sum(p.stat().st_size for p in (tmp_path / "l" / "shards").glob("*.safetensors")) / 2**20
    assert stored > 40  # the large store is bigger than any noise in the RSS measurement
    assert large - small < 0.25 * stored, (small, large, stored)
    print(f"peak RSS {small:.0f} MiB (128 images) vs {large:.0f} MiB (2560 images, {stored:.0f} MiB stored)")
