"""`hooked-vit demo`: every analysis on the embedded default, then one HTML report.

No downloads: the synthetic dataset is generated, the model is the project's own. Each
command module contributes its step (`demo(ctx)`); runs are resumable, so an interrupted
demo continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from circuits.commands import DemoContext, command_modules
from circuits.report import build_report
from circuits.sources import load_dataset, load_model


def run_demo(out: str | Path = "demo_out", n: int = 512, batch_size: int = 64, device: str = "cpu",
             overwrite: bool = False, threads: int | None = 1) -> Path:
    """Run every demo step and build the report; returns the report's path.

    threads: torch CPU threads during the demo (default 1: the embedded model is tiny, and
    extra threads only wait on each other, badly so when other processes share the cores).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_steps(Path(out), n, batch_size, device, overwrite)
    finally:
        torch.set_num_threads(previous)


def _run_steps(out: Path, n: int, batch_size: int, device: str, overwrite: bool) -> Path:
    torch.manual_seed(0)
    trained = load_model("embedded", device=device)
    ctx = DemoContext(out=out, trained=trained, random=load_model("embedded", device=device, random_weights=True),
                      data=load_dataset(f"synthetic:test:{n}", trained), batch_size=batch_size,
                      overwrite=overwrite, device=device)
    for module in command_modules():
        if hasattr(module, "demo"):
            start = time.perf_counter()
            module.demo(ctx)
            print(f"demo step {module.__name__.rsplit('.', 1)[1]}: {time.perf_counter() - start:.1f} s")
    return build_report([out], out / "report.html", title="hooked-vit demo: embedded default")
