"""bf16 runs that used to fail after all their work (issue 23, item 6): numpy has no bfloat16,
so every tensor bound for a table goes through `circuits.arrays.to_numpy`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from circuits.arrays import to_numpy
from circuits.cli import main


def test_to_numpy_makes_low_precision_float32_and_keeps_the_rest():
    for dtype in (torch.bfloat16, torch.float16):
        out = to_numpy(torch.tensor([1.5, -2.0], dtype=dtype, requires_grad=True))
        assert out.dtype == np.float32 and out.tolist() == [1.5, -2.0]
    assert to_numpy(torch.arange(3)).dtype == np.int64
    assert to_numpy(torch.ones(2, dtype=torch.float64)).dtype == np.float64


def test_bf16_circuit_run_writes_its_edges(tmp_path):
    out = tmp_path / "circuit"
    assert main(["circuit", "--dtype", "bf16", "--data", "synthetic:test:8", "--limit", "4", "--batch-size", "4",
                 "--budget", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    edges = pd.read_parquet(out / "edge_scores.parquet")
    assert summary["n_edges_kept"] == 3 and len(edges) == summary["n_edges"]
    assert edges["score"].dtype == np.float32 and np.isfinite(edges["score"]).all()


def test_bf16_decompose_run_fits_and_resumes(tmp_path):
    args = ["decompose", "--dtype", "bf16", "--data", "synthetic:test:8", "--batch-size", "4",
            "--reference-limit", "16", "--out", str(tmp_path / "d")]
    assert main([*args, "--limit", "4"]) == 0
    assert main([*args, "--limit", "6"]) == 0  # the fitted reference read back from its float32 file
    assert len(pd.read_parquet(tmp_path / "d" / "images")) == 6
