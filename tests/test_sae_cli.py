"""`hooked-vit sae train|eval|features` end to end on the embedded default (tiny budget), then the report."""

from __future__ import annotations

import json

from circuits.cli import main
from circuits.report import build_report


def test_sae_cli_and_report(tmp_path):
    sae, ev, feat = tmp_path / "sae", tmp_path / "eval", tmp_path / "feat"
    assert main(["sae", "train", "--out", str(sae), "--data", "synthetic:train:128", "--steps", "40",
                 "--d-sae", "64", "--k", "4", "--batch-size", "64", "--train-batch", "256"]) == 0
    assert (sae / "cfg.json").exists() and (sae / "sae_weights.safetensors").exists()
    from circuits.sae.train import DEFAULT_LR

    settings = json.loads((sae / "manifest.json").read_text())["settings"]
    assert DEFAULT_LR["topk"] == 4e-3 and settings["lr"] == DEFAULT_LR["topk"], settings  # the per-architecture default
    assert main(["sae", "eval", "--sae", str(sae), "--out", str(ev), "--data", "synthetic:test:64"]) == 0
    metrics = json.loads((ev / "eval.json").read_text())
    assert metrics["l0"] <= 4 and abs(metrics["ce_spliced_with_error"] - metrics["ce_clean"]) < 1e-4
    assert main(["sae", "features", "--sae", str(sae), "--out", str(feat), "--data", "synthetic:test:64"]) == 0
    summary = json.loads((feat / "features.json").read_text())
    assert {r["value"] for r in summary["identified"]["label"]} <= set(range(10))
    page = build_report([tmp_path], tmp_path / "r.html").read_text()
    assert "Sparse autoencoders" in page and "data:image/png;base64" in page and "No renderer" not in page
    assert page.count("<h2>Sparse autoencoders") == 1  # one section for the train, eval, features and store runs
    assert main(["sae", "eval", "--sae", str(tmp_path / "nope"), "--out", str(ev), "--data", "synthetic:test:8"]) == 2
