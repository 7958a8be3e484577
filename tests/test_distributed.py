"""Sharded runs under torchrun (gloo, CPU): the same rows and values as one process, and a
killed rank's shard resumed by a rerun with another number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from circuits.runs.distributed import Dist, require_single_process, shard_batches
from circuits.runs.results import RunStore, read_manifest, read_table
import distributed_driver as driver

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "distributed_driver.py"
N, BATCH = 20, 4  # five batches: two ranks take 0, 2, 4 and 1, 3


def launch(analysis: str, out: Path, nproc: int, **env: str) -> subprocess.CompletedProcess:
    """The driver as one plain process (nproc 0) or under torchrun with nproc ranks."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (torchrun if nproc else [sys.executable]) + [str(DRIVER), analysis, str(out), str(N), str(BATCH)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def run_ok(analysis: str, out: Path, nproc: int) -> Path:
    done = launch(analysis, out, nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_same_results(expected: Path, actual: Path) -> None:
    driver.assert_same_results(expected, actual)
    assert read_manifest(actual)["done"] == list(range(N))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    return {a: run_ok(a, root / a, 0) for a in ("identify", "explain", "memories")}


@pytest.mark.parametrize("analysis", ["identify", "memories"])
def test_two_ranks_equal_one_process(reference, tmp_path, analysis):
    out = run_ok(analysis, tmp_path / "two", 2)
    assert (out / "manifest-rank00001.json").exists()  # each rank wrote its own manifest part
    assert_same_results(reference[analysis], out)


def test_two_ranks_gradient_explain_equals_one_process(reference, tmp_path):
    out = run_ok("explain", tmp_path / "two", 2)
    assert_same_results(reference["explain"], out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((reference["explain"] / "summary.json").read_text())
    assert [row["method"] for row in summary] == ["gae", "random"]


def test_killed_rank_is_resumed_by_a_rerun_with_another_world_size(reference, tmp_path):
    out = tmp_path / "run"
    killed = launch("identify", out, 2, CRASH_RANK="1", CRASH_AFTER="1")
    assert killed.returncode != 0
    done = set(read_manifest(out)["done"])
    assert set(range(4, 8)) <= done and not set(range(12, 16)) & done  # rank 1 died in its second batch
    assert_same_results(reference["identify"], run_ok("identify", out, 3))


def test_shards_are_disjoint_whole_batches_of_the_pending_items():
    done = set(range(4, 8))  # batch 1 was done earlier
    shards = [shard_batches(range(22), done, 4, Dist(r, 3)) for r in range(3)]
    assert shards[0] == [[0, 1, 2, 3], [16, 17, 18, 19]]
    assert shards[1] == [[8, 9, 10, 11], [20, 21]] and shards[2] == [[12, 13, 14, 15]]
    assert shard_batches(range(8), set(range(8)), 4, Dist(0, 2)) == []
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(range(8), set(), 0, Dist())


class NoWait(Dist):
    """A rank of a pretend world (no process group): barriers return at once."""

    def barrier(self) -> None:
        pass


def test_done_set_is_the_union_of_every_ranks_manifest(tmp_path):
    settings = {"analysis": "t"}
    table = {"rows": pa.table({"index": np.arange(2)})}
    RunStore(tmp_path, settings, dist=NoWait(0, 2)).write_batch(0, table, [0, 1])
    RunStore(tmp_path, settings, dist=NoWait(1, 2)).write_batch(2, {"rows": pa.table({"index": [2, 3]})}, [2, 3],
                                                               [{"index": 3, "path": "x", "reason": "bad"}])
    store = RunStore(tmp_path, settings, dist=Dist())
    assert store.done == {0, 1, 2, 3} and store.skipped[0]["index"] == 3
    assert read_manifest(tmp_path)["done"] == [0, 1, 2, 3] and len(read_table(tmp_path, "rows")) == 4
    with pytest.raises(ValueError, match="other settings"):
        RunStore(tmp_path, {"analysis": "other"}, dist=Dist())
    RunStore(tmp_path, settings, overwrite=True, dist=Dist())
    assert not list(tmp_path.glob("manifest-rank*.json")) and not list(tmp_path.glob("rows/part-*"))


def test_analyses_needing_all_data_refuse_a_sharded_run():
    with pytest.raises(ValueError, match="probes does not run sharded.*one process"):
        require_single_process("probes", Dist(1, 2))
    require_single_process("decompose", Dist())  # one process: fine


def test_gpu_check_script_dry_run_lists_what_it_skips():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("skip: ")]
    names = [line.split(":")[1].strip() for line in skipped]
    assert names == ["gpu_tests", "forward_fp32", "identify_fp32", "forward_bf16", "identify_bf16",
                     "one_process", "torchrun_2", "compare"], done.stdout
    assert "--dtype bf16" in skipped[3] and "--nproc-per-node 2" in skipped[6]
    assert "dry run" in done.stdout.splitlines()[-1]
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert bad.returncode == 2 and "unknown option" in bad.stderr
