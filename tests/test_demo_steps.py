"""The demo runs circuit discovery, a small SAE and TextSpan too, and the report shows them
(issue 23 item 17: README / `demo --help` say the demo runs every analysis)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from circuits.report import build_report
from circuits.report.demo import STEPS, DemoContext
from circuits.runs.sources import load_dataset, load_model
from circuits.runs.specs import parse_model_spec


def test_demo_steps_cover_circuit_sae_and_textspan(tmp_path):
    assert {"circuit", "sae", "textspan"} <= set(STEPS)
    torch.manual_seed(0)
    spec = parse_model_spec("embedded")
    model = load_model(spec)
    ctx = DemoContext(out=tmp_path, trained=model, random=model, data=load_dataset("synthetic:test:48", model, spec),
                      batch_size=48)
    for name in ("circuit", "sae", "textspan"):
        STEPS[name](ctx)
    runs = sorted(str(p.parent.relative_to(tmp_path)) for p in Path(tmp_path).rglob("manifest.json"))
    assert runs == ["circuit/trained", "sae/eval", "sae/features", "sae/train", "sae/train/activations",
                    "textspan/trained (class directions)"]
    html = build_report([tmp_path], tmp_path / "report.html").read_text()
    for title in ("Circuit discovery", "Sparse autoencoders", "TextSpan"):
        assert title in html, title
    assert model.cfg.class_names[0] in html.split("TextSpan: the texts")[1]  # the class names stand in for prompts


def test_demo_video_step_runs_the_shipped_video_models(tmp_path):
    """The demo covers video offline: identify and a motion circuit on the motion model, no
    cross-frame attention on it and on the static control; the report draws them; the motion
    model loses its accuracy without cross-frame attention, the control does not; the circuit
    recovers most of the motion logit difference."""
    torch.manual_seed(0)
    spec = parse_model_spec("embedded")
    model = load_model(spec)
    ctx = DemoContext(out=tmp_path, trained=model, random=model, data=load_dataset("synthetic:test:32", model, spec),
                      batch_size=32)
    STEPS["video"](ctx)
    runs = sorted(str(p.parent.relative_to(tmp_path)) for p in Path(tmp_path).rglob("manifest.json"))
    assert runs == ["video/circuit/video_motion", "video/identify/video_motion",
                    *(f"video/perturb/{m}/{k}" for m in ("video_motion", "video_shape") for k in ("no_cross_frame", "none"))]
    summary = json.loads((tmp_path / "video/circuit/video_motion/summary.json").read_text())
    assert summary["n_images"] == 32 and summary["n_edges_kept"] == 20 and summary["faithfulness"] > 0.6, summary
    acc = {}
    for run in runs[2:]:
        table = pd.read_parquet(tmp_path / run / "images")
        acc[run.split("/", 2)[2]] = float(table["correct"].mean())
    assert acc["video_motion/none"] > 0.9 and acc["video_motion/no_cross_frame"] < 0.45, acc
    assert acc["video_shape/none"] - acc["video_shape/no_cross_frame"] < 0.15, acc
    html = build_report([tmp_path], tmp_path / "report.html").read_text()
    assert "video_motion" in html and "no_cross_frame" in html and "reverse_frames" in html
