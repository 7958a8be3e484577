"""Linear probes: the closed form against a reference solver, streaming sufficient statistics,
hook wiring on a model, and a whole run on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.data import ArrayDataset
from circuits.probes import (
    RidgeAccumulator, accuracy_by_layer, dataset_labels, per_class_indices, probe_batch, ridge_fit, signed_one_hot,
    available_memory_bytes, probe_memory_bytes, spd_solve, train_probes,
)
from circuits.runs.probe import load_probe_results, run_probes
from circuits.projection import SITES, class_rank, project_batch
from helpers import images, make_timm
from hooked_vit import HookedViT


def reference_ridge(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """min ||X W + 1 b - Y||^2 + alpha ||W||^2 (b unpenalised) as one least-squares problem on
    the augmented system [[X, 1], [sqrt(alpha) I, 0]] [W; b] = [Y; 0]."""
    n, d = X.shape
    A = np.block([[X, np.ones((n, 1))], [np.sqrt(alpha) * np.eye(d), np.zeros((d, 1))]])
    B = np.vstack([Y, np.zeros((d, Y.shape[1]))])
    sol = np.linalg.lstsq(A, B, rcond=None)[0]
    return sol[:d], sol[d]


def test_signed_one_hot():
    y = signed_one_hot(torch.tensor([2, 0]), 3)
    assert y.tolist() == [[-1, -1, 1], [1, -1, -1]]


@pytest.mark.parametrize("alpha,offset", [(1.0, 0.0), (0.3, 500.0), (10.0, -3.0)])
def test_ridge_matches_augmented_least_squares(alpha, offset):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 8)) * rng.uniform(0.5, 3, size=8) + offset  # far-off mean: centring is exercised
    labels = rng.integers(0, 4, 30)
    Y = signed_one_hot(torch.as_tensor(labels), 4).numpy()
    W, b = ridge_fit(torch.as_tensor(X), torch.as_tensor(Y), alpha)
    W_ref, b_ref = reference_ridge(X, Y, alpha)
    np.testing.assert_allclose(W.numpy(), W_ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-6, atol=1e-6)


def test_accumulated_batches_equal_one_fit_per_group():
    """Streaming X^T X / X^T Y over uneven batches == fitting each group on all rows at once."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(23, 3, 5, generator=gen, dtype=torch.float64) * 2 + 7  # n, groups (positions), d
    Y = signed_one_hot(torch.randint(0, 4, (23,), generator=gen), 4)
    acc = RidgeAccumulator((3,), 5, 4)
    for chunk in (slice(0, 4), slice(4, 5), slice(5, 23)):
        acc.update(X[chunk], Y[chunk])
    W, b = acc.solve(1.0)
    assert acc.n == 23 and W.shape == (3, 5, 4) and b.shape == (3, 4)
    for g in range(3):
        W_ref, b_ref = ridge_fit(X[:, g], Y)
        torch.testing.assert_close(W[g], W_ref)
        torch.testing.assert_close(b[g], b_ref)


def test_spd_solve_matches_dense_solve():
    """Cholesky path == numpy's LU solve of (S + alpha I) W = B, batched over groups."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 4, 6))  # 3 groups, 4 rows < 6 features: S alone is singular
    S = np.einsum("gni,gnj->gij", X, X)
    B = rng.normal(size=(3, 6, 2))
    W = spd_solve(torch.as_tensor(S), torch.as_tensor(B), 0.5).numpy()
    np.testing.assert_allclose(W, np.linalg.solve(S + 0.5 * np.eye(6), B), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_ridge_refuses_non_positive_alpha(alpha):
    X, Y = torch.randn(5, 3, dtype=torch.float64), signed_one_hot(torch.tensor([0, 1, 0, 1, 1]), 2)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ridge_fit(X, Y, alpha)


def test_ridge_refuses_non_finite_features():
    X = torch.randn(5, 3, dtype=torch.float64)
    X[2, 1] = float("inf")
    with pytest.raises(ValueError, match="not positive definite"):
        ridge_fit(X, signed_one_hot(torch.tensor([0, 1, 0, 1, 1]), 2))


# Run in a fresh interpreter: the test session pins one thread, and a hang must not take
# the suite down with it. The original batched torch.linalg.solve hangs here (MKL DLASWP
# error) within the first second; the Cholesky path takes a few seconds.
VIT_B32_PROBE = textwrap.dedent("""
    import time, timm, torch
    torch.set_num_threads(2)
    from circuits.probes import train_probes
    from circuits.data import ArrayDataset
    from hooked_vit import HookedViT
    torch.manual_seed(0)
    model = HookedViT.from_timm(timm.create_model("vit_base_patch32_224", pretrained=False).eval())
    assert (model.cfg.d_model, model.cfg.n_classes) == (768, 1000)
    x, labels = torch.randn(6, 3, 224, 224), torch.tensor([0, 1, 2, 0, 1, 2])
    start = time.perf_counter()
    probes = train_probes(model, ArrayDataset(x.numpy(), labels.numpy()), sites=("block",), layers=[11],
                          batch_size=6, progress=False)
    elapsed = time.perf_counter() - start
    assert probes.W.shape == (1, 1, 50, 768, 1000) and bool(torch.isfinite(probes.W).all())
    # 6 images < 768 features, alpha 1: every position's probe fits its training labels.
    pred = probes.scores("block", 11, model.run_with_cache(x)[1]["blocks.11.hook_resid_post"]).argmax(-1)
    assert bool((pred == labels[:, None]).all()), pred
    print(f"ok {elapsed:.1f}s threads={torch.get_num_threads()}")
""")


def test_probe_at_vit_b32_size_with_two_threads_finishes():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", VIT_B32_PROBE], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)  # expected ~10 s on 2 busy cores
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "DLASWP" not in out.stderr


def test_per_class_indices_and_labels():
    labels = np.array([1, 0, 1, 1, 2, 0, 2, 1])
    assert per_class_indices(labels, 2) == [0, 1, 2, 4, 5, 6]
    assert per_class_indices(labels, 1) == [0, 1, 4]
    data = ArrayDataset(np.zeros((8, 3, 4, 4), np.float32), labels)
    assert dataset_labels(data).tolist() == labels.tolist()


@pytest.fixture(scope="module")
def setup():
    timm_model, size = make_timm("vit_tiny_patch16_224", seed=3)
    model = HookedViT.from_timm(timm_model)
    x = images(size, batch=28, seed=5)
    labels = np.arange(28) % 10
    return model, ArrayDataset(x.numpy(), labels), x, torch.as_tensor(labels)


def test_train_probes_equals_fit_on_cached_features(setup):
    """The hooks feed the right activations: per (site, layer, position), the probe equals
    a ridge fit on the features read from the cache."""
    model, data, x, labels = setup
    probes = train_probes(model, data, batch_size=8, progress=False)
    n_tok = model.cfg.n_prefix_tokens + model.cfg.grid_size[0] * model.cfg.grid_size[1]
    assert probes.W.shape == (3, model.cfg.n_layers, n_tok, model.cfg.d_model, 10) and probes.n_train == 28
    _, cache = model.run_with_cache(x)
    Y = signed_one_hot(labels, 10)
    for s, site in enumerate(probes.sites):
        for layer in range(model.cfg.n_layers):
            for pos in (0, n_tok - 1):
                W, b = ridge_fit(cache[f"blocks.{layer}.{SITES[site]}"][:, pos], Y)
                torch.testing.assert_close(probes.W[s, layer, pos], W.float(), rtol=2e-4, atol=2e-5)
                torch.testing.assert_close(probes.b[s, layer, pos], b.float(), rtol=2e-4, atol=2e-5)


def test_probe_batch_ranks(setup):
    model, data, x, labels = setup
    probes = train_probes(model, data, layers=[1], sites=("block", "mlp"), batch_size=28, progress=False)
    out = probe_batch(model, probes, x[:6], labels[:6])
    _, cache = model.run_with_cache(x[:6])
    act = cache["blocks.1.hook_mlp_out"]
    expected = class_rank(probes.scores("mlp", 1, act), labels[:6, None])
    torch.testing.assert_close(out.probe_rank[:, 1, 0], expected)
    proj = project_batch(model, x[:6], labels[:6], sites=("block", "mlp"))
    torch.testing.assert_close(out.projection_rank, proj.rank[:, :, [1]])
    # Few images (28 < d_model 48), small alpha: the probes nearly interpolate their training set.
    train_acc = (probe_batch(model, probes, x, labels).probe_rank[:, 0] == 0).float().mean()
    assert train_acc > 0.9


def test_run_probes_on_disk(setup, tmp_path):
    model, data, _, _ = setup
    store = run_probes(model, data, data, str(tmp_path / "run"), per_class=1, batch_size=8, progress=False)
    res = load_probe_results(tmp_path / "run")
    # Same dataset for training and test: the 10 training images are left out.
    assert sorted(res.images["index"]) == list(range(10, 28)) and len(store.done) == 18
    assert res.probe_rank.shape == res.projection_rank.shape == (18, 3, model.cfg.n_layers, 10)
    table = accuracy_by_layer(res)
    assert set(table["token"]) == {"cls", "image"} and len(table) == 3 * model.cfg.n_layers * 2
    first = table.iloc[0]
    assert first["probe_accuracy"] == pytest.approx((res.probe_rank[:, 0, 0, 0] == 0).mean())
    assert first["projection_rank"] == pytest.approx(res.projection_rank[:, 0, 0, 0].mean())
    again = run_probes(model, data, data, str(tmp_path / "run"), per_class=1, batch_size=8, progress=False)
    assert again.done == store.done  # resumed: nothing left to do


def test_probe_memory_estimate_counts_every_large_tensor():
    """positions x d x classes float64 X^T Y and float32 W count, not only X^T X (issue 23 item 5)."""
    P, d, c = 197, 768, 1000
    per_group = P * (8 * d * d + 8 * d * c + 4 * d * c)
    solve = P * (3 * d * d + 2 * d * c) * 8
    assert probe_memory_bytes(3, 12, P, d, c) == 36 * per_group + solve
    assert probe_memory_bytes(3, 12, P, d, c) > 100e9  # ViT-B/16 defaults: killed on a 24 GB machine


def test_probe_refuses_up_front_when_estimate_exceeds_memory(monkeypatch):
    """A 1000-class model (tiny width): with less memory available than the estimate, one
    UserError before any forward pass, naming the estimate, the memory and --layers."""
    import circuits.probes as probes_mod
    from hooked_vit.errors import UserError

    timm_model, size = make_timm("vit_tiny_patch16_224", seed=1, num_classes=1000)
    model = HookedViT.from_timm(timm_model)
    cfg = model.cfg
    need = probe_memory_bytes(3, cfg.n_layers, cfg.n_ctx, cfg.d_model, 1000)
    data = ArrayDataset(images(size, batch=4).numpy(), np.array([0, 1, 2, 3]))
    forwards = []
    monkeypatch.setattr(model, "run_with_hooks", lambda *a, **k: forwards.append(1))
    monkeypatch.setattr(probes_mod, "available_memory_bytes", lambda device="cpu": need - 1)
    with pytest.raises(UserError, match=r"need about .* GB .*1000 classes.* GB available.*--layers") as err:
        train_probes(model, data, batch_size=4, progress=False)
    assert "\n" not in str(err.value) and forwards == []
    # Fewer layers fit: the estimate shrinks and the run goes ahead.
    monkeypatch.undo()
    monkeypatch.setattr(probes_mod, "available_memory_bytes", lambda device="cpu": need - 1)
    probes = train_probes(model, data, layers=[0], batch_size=4, progress=False)
    assert probes.W.shape == (3, 1, cfg.n_ctx, cfg.d_model, 1000)


def test_available_memory_is_positive():
    assert available_memory_bytes() > 0
