"""The demo runs circuit discovery, a small SAE and TextSpan too, and the report shows them
(issue 23 item 17: README / `demo --help` say the demo runs every analysis)."""

from __future__ import annotations

from pathlib import Path

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
