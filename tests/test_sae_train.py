"""SAE training: the losses equal SAELens 6's (fixture made by SAELens itself), a killed run resumes
to exactly the uninterrupted result, the log is a table, clipping and the JumpReLU threshold init act."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.train import (DEFAULT_SPARSITY, LOG_TABLE, STATE_FILE, TrainConfig, _jumprelu_sparsity,
                                _pre_act_loss, auxk_loss, train_dictionary)

FIXTURE = Path(__file__).parent / "fixtures" / "saelens_training" / "losses.safetensors"


@pytest.fixture(scope="module")
def ref():
    with safe_open(str(FIXTURE), "pt") as f:
        assert f.metadata()["sae_lens"].startswith("6.")
    return load_file(FIXTURE)


def _loaded(ref, arch: str, **cfg) -> SparseDictionary:
    sae = SparseDictionary(DictionaryConfig(ref["x"].shape[1], ref["b_enc"].shape[0], arch, k=3, **cfg))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(ref[name])
        if arch == "jumprelu":
            sae.log_threshold.copy_(ref["threshold"].log())
    return sae


def test_auxk_equals_saelens(ref):
    sae = _loaded(ref, "topk")
    x, dead = ref["x"], ref["dead"].bool()
    z = sae.pre_acts(x)
    err = x - sae.decode(sae.activate(z))
    loss = TrainConfig().aux_coeff * auxk_loss(sae, z, err, dead)
    assert TrainConfig().aux_coeff == float(ref["topk_aux_coefficient"])  # SAELens's default weight
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref["topk_aux"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.W_enc.grad, ref["topk_aux_grad_W_enc"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.W_dec.grad, ref["topk_aux_grad_W_dec"], rtol=1e-5, atol=1e-6)
    assert auxk_loss(sae, z, err, torch.zeros_like(dead)).item() == 0.0


@pytest.mark.parametrize("mode", ["step", "tanh"])
def test_jumprelu_sparsity_losses_and_straight_through_gradients_equal_saelens(ref, mode):
    sae = _loaded(ref, "jumprelu", jumprelu_bandwidth=0.3)
    x, dead = ref["x"], ref["dead"].bool()
    z = sae.pre_acts(x)
    loss = _jumprelu_sparsity(sae, z, sae.activate(z), TrainConfig(jumprelu_sparsity=mode))
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[f"jumprelu_{mode}_l0"], rtol=1e-5, atol=1e-6)
    # SAELens learns theta itself, we learn log(theta): d/dlog(theta) = theta * d/dtheta
    grad_theta = (sae.log_threshold.grad / ref["threshold"]).float()
    torch.testing.assert_close(grad_theta, ref[f"jumprelu_{mode}_grad_threshold"], rtol=1e-4, atol=1e-5)
    w_enc_grad = sae.W_enc.grad if sae.W_enc.grad is not None else torch.zeros_like(sae.W_enc)
    torch.testing.assert_close(w_enc_grad, ref[f"jumprelu_{mode}_grad_W_enc"], rtol=1e-5, atol=1e-6)
    pre_act = _pre_act_loss(sae, z.detach(), dead, 0.5)
    torch.testing.assert_close(pre_act, ref["jumprelu_pre_act"], rtol=1e-5, atol=1e-6)


def _data(n: int = 2048, d: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    atoms = torch.randn(48, d, generator=gen)
    codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.08)
    return codes @ atoms + 0.3


def _batches(x: torch.Tensor, crash_at: int | None = None):
    taken = [0]

    def batches(epoch: int):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for b in range(0, len(x), 256):
            taken[0] += 1
            if crash_at is not None and taken[0] == crash_at:
                raise RuntimeError("killed")
            yield {"x": x[perm[b:b + 256]]}
    return batches


def _cfg(arch: str, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": 30, "lr": 3e-3, "warmup_steps": 3, "checkpoint_every": 10, "dead_after_tokens": 768,
                          "resample_every": 7, **kw})


def _sae(arch: str) -> SparseDictionary:
    return SparseDictionary(DictionaryConfig(16, 128, arch, k=2, hook_name="x"), seed=3)


def _plain(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "rows_per_s"} for r in log]


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, arch):
    x = _data()
    whole = _sae(arch)
    log_whole = train_dictionary(whole, _batches(x), _cfg(arch), out=tmp_path / "whole", progress=False)
    assert any(r["dead"] for r in log_whole) or arch != "topk"  # AuxK / resampling took part
    with pytest.raises(RuntimeError, match="killed"):  # the 27th batch read (step 26's) kills it
        train_dictionary(_sae(arch), _batches(x, crash_at=27), _cfg(arch), out=tmp_path / "cut", progress=False)
    state = torch.load(tmp_path / "cut" / "checkpoints" / STATE_FILE, weights_only=True)
    assert state["step"] == 20 and state["since_fired"].shape == (128,) and "exp_avg" in str(state["optimizer"])
    with pytest.raises(ValueError, match="other settings"):
        train_dictionary(_sae(arch), _batches(x), _cfg(arch, lr=1e-3), out=tmp_path / "cut", progress=False)
    resumed = _sae(arch)
    log_resumed = train_dictionary(resumed, _batches(x), _cfg(arch), out=tmp_path / "cut", progress=False)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert _plain(log_resumed) == _plain(log_whole)
    table = pd.read_parquet(tmp_path / "cut" / LOG_TABLE)
    assert len(table) == 30 and table["step"].tolist() == list(range(1, 31))
    assert {"loss", "mse", "penalty", "l0", "dead", "lr", "sparsity_coeff", "grad_norm"} <= set(table.columns)
    assert (tmp_path / "cut" / "checkpoints" / "step-20" / "cfg.json").exists()


def test_sparsity_weight_and_learning_rate_warm_up():
    x = _data()
    log = train_dictionary(_sae("relu"), _batches(x), _cfg("relu", checkpoint_every=0, sparsity_coeff=0.2,
                                                           sparsity_warmup_steps=10), progress=False)
    assert [r["sparsity_coeff"] for r in log[:10]] == pytest.approx([0.02 * (i + 1) for i in range(10)])
    assert all(r["sparsity_coeff"] == pytest.approx(0.2) for r in log[10:])
    assert log[0]["lr"] < log[2]["lr"] and log[-1]["lr"] == 0.0
    default = train_dictionary(_sae("relu"), _batches(x), _cfg("relu", steps=2, checkpoint_every=0), progress=False)
    centred = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]]
    rms = math.sqrt(float((centred - centred.mean(0)).pow(2).sum(-1).mean()))
    assert default[-1]["sparsity_coeff"] == pytest.approx(DEFAULT_SPARSITY["relu"] * rms, rel=1e-5)  # scale-free


def test_gradient_clipping_limits_the_update():
    x = _data()

    def moved(clip: float) -> float:
        sae = _sae("topk")  # b_enc starts at 0 and is not touched by the initialisation
        train_dictionary(sae, _batches(x), _cfg("topk", steps=1, warmup_steps=1, grad_clip=clip, checkpoint_every=0),
                         progress=False)
        return float(sae.b_enc.detach().abs().max())

    # Adam's first step is lr * sign(g) unless the clipped gradient falls below its eps
    assert moved(0.0) == pytest.approx(3e-3, rel=1e-3) and moved(1e-9) < 1e-4


def test_jumprelu_thresholds_start_at_the_fire_rate():
    x = _data()
    log = train_dictionary(_sae("jumprelu"), _batches(x),
                           _cfg("jumprelu", steps=1, lr=1e-12, checkpoint_every=0, jumprelu_init_fire_rate=0.25),
                           progress=False)
    assert log[0]["l0"] == pytest.approx(0.25 * 128, abs=2.0)
    with pytest.raises(ValueError, match="jumprelu_sparsity"):
        TrainConfig(jumprelu_sparsity="l1")
