"""Low-precision runs: the dtype names, a model loaded in bf16, and an identify run on it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from circuits.runs.identify import identify
from circuits.runs.precision import parse_dtype
from circuits.runs.sources import load_model, synthetic_for


def test_dtype_names_and_a_clear_error():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float8'; use one of fp32, bf16, fp16"):
        parse_dtype("float8")


def test_bf16_identify_run_agrees_with_fp32(tmp_path):
    data = synthetic_for("default", "test", 16)
    low = load_model("embedded", dtype=parse_dtype("bf16"))
    assert low.embed.proj.weight.dtype == torch.bfloat16 and low.W_U.dtype == torch.bfloat16
    identify(low, data, tmp_path / "bf16", batch_size=8, progress=False)
    identify(load_model("embedded"), data, tmp_path / "fp32", batch_size=8, progress=False)
    a, b = (pd.read_parquet(tmp_path / d / "images").sort_values("index") for d in ("fp32", "bf16"))
    assert (a["pred"].to_numpy() == b["pred"].to_numpy()).mean() >= 0.9
    ranks = [pd.read_parquet(tmp_path / d / "tokens").sort_values(["index", "site", "layer"])["rank"] for d in
             ("fp32", "bf16")]
    agree = torch.tensor([(x == y).mean() for x, y in zip(*(r.to_numpy() for r in ranks))]).mean()
    assert agree > 0.9  # measured 0.986 over 256 images (docs/scaling.md)


def test_cli_dtype_reaches_the_model(monkeypatch, tmp_path):
    """--dtype is shown by every model command and honoured: the identify run gets a bf16 model."""
    import torch

    import circuits.runs.identify as run_identify
    from circuits.cli import main

    seen = {}

    def capture(model, *args, **kwargs):
        seen["dtype"] = model.embed.proj.weight.dtype
        raise KeyboardInterrupt  # stop before any work; the CLI answers 130

    monkeypatch.setattr(run_identify, "identify", capture)
    assert main(["identify", "--out", str(tmp_path / "o"), "--data", "synthetic:test:4", "--dtype", "bf16"]) == 130
    assert seen["dtype"] == torch.bfloat16


def test_bf16_runs_end_to_end_on_every_dataset_command(tmp_path):
    """Every path that feeds images to a bf16 model casts them (explain's randomisation check,
    SAE evaluation and feature studies used to pass fp32 images and crash)."""
    from circuits.cli import main

    common = ["--dtype", "bf16", "--batch-size", "4"]
    assert main(["explain", "--out", str(tmp_path / "ex"), "--data", "synthetic:test:4", "--methods", "attention",
                 "--sanity-images", "2", *common]) == 0
    assert main(["sae", "train", "--out", str(tmp_path / "sae"), "--data", "synthetic:train:8", "--steps", "5",
                 "--d-sae", "32", "--train-batch", "64", *common]) == 0
    for sub in ("eval", "features"):
        assert main(["sae", sub, "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / sub),
                     "--data", "synthetic:test:4", *common]) == 0
