"""`hooked-vit demo`: every analysis on the embedded default, then one HTML report.

No downloads: the synthetic dataset is generated, the model is the project's own.
Runs are resumable, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from circuits.identify import identify
from circuits.report import build_report
from circuits.sources import load_dataset, load_model


def run_demo(out: str | Path = "demo_out", n: int = 512, batch_size: int = 64, device: str = "cpu",
             overwrite: bool = False) -> Path:
    out = Path(out)
    torch.manual_seed(0)
    trained = load_model("embedded", device=device)
    random = load_model("embedded", device=device, random_weights=True)
    data = load_dataset(f"synthetic:test:{n}", trained)
    for label, model in (("trained", trained), ("random weights", random)):
        identify(model, data, str(out / "identify" / label), batch_size=batch_size, overwrite=overwrite)
    return build_report([out / "identify"], out / "report.html", title="hooked-vit demo: embedded default")
