"""benchmarks/video.py runs (a tiny VideoMAE, one round): HookedViT's logits equal transformers',
every contender is timed and the cache's memory is reported (docs/video.md, "Benchmark")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_video_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("video_benchmark", ROOT / "benchmarks" / "video.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "video.json"
    assert bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "2", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["batch_size"] for r in records] == [1, 2] and records[0]["input_shape"] == [1, 4, 3, 32, 32]
    for rec in records:
        assert set(rec["contenders"]) == {"hf", "hooked", "cache_all"}
        assert max(rec["max_abs_diff_vs_hf"].values()) < 1e-5
        assert rec["contenders"]["hf"]["ratio_vs_hf"] == 1.0 and rec["contenders"]["cache_all"]["cache_bytes"] > 0
    table = capsys.readouterr().out
    assert "videomae-tiny" in table and "ratio vs hf" in table
