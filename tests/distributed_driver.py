"""A dataset run for tests/test_distributed.py, launched with or without torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_driver.py identify OUT N BATCH

    python tests/distributed_driver.py compare RUN_A RUN_B   # same rows and values, or exit 1

CRASH_RANK / CRASH_AFTER (environment): that rank exits abruptly (no cleanup, as a killed
process) when it starts its batch number CRASH_AFTER + 1, to test resuming. DEVICE=cuda:
each rank on its LOCAL_RANK's GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from circuits.runs.memories import memories
from circuits.runs.distributed import init_distributed
from circuits.runs.explain import benchmark
from circuits.runs.identify import identify
from circuits.runs.results import read_manifest, read_table
from circuits.runs.sources import load_model, synthetic_for
from circuits.runs.streaming import describe_dataset


class CrashingAfter(Dataset):
    """The same items as `inner`, but the process exits when it reads item number `after`."""

    def __init__(self, inner: Dataset, after: int):
        self.inner, self.after, self.reads = inner, after, 0

    def describe(self) -> str:  # the same run as the inner dataset's, so a rerun resumes it
        return describe_dataset(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def meta(self, i):  # labels without reading items, as the inner dataset: the same thumbnails are chosen
        return self.inner.meta(i)

    def __getitem__(self, i):
        if self.reads == self.after:
            os._exit(3)
        self.reads += 1
        return self.inner[i]


def main(analysis: str, out: str, n: int, batch_size: int) -> None:
    device = os.environ.get("DEVICE", "cpu")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    model = load_model("embedded", device=device)
    dataset = synthetic_for("default", "test", n)
    crash_rank = os.environ.get("CRASH_RANK")
    if crash_rank is not None and init_distributed().rank == int(crash_rank):
        dataset = CrashingAfter(dataset, int(os.environ["CRASH_AFTER"]) * batch_size)
    if analysis == "identify":
        identify(model, dataset, out, batch_size=batch_size, k=3, progress=False)
    elif analysis == "explain":
        benchmark(model, dataset, out, ["gae", "random"], batch_size=batch_size, fractions=[0.0, 0.5, 1.0],
                  thumbnails=2, progress=False)
    elif analysis == "memories":
        memories(model, dataset, out, batch_size=batch_size, progress=False)
    else:
        raise ValueError(f"unknown analysis {analysis!r}; use identify, explain or memories")


def assert_same_results(expected: str | Path, actual: str | Path) -> None:
    """Every table of run `expected` has the same rows and values in run `actual`, and both
    are done on the same items."""
    expected, actual = Path(expected), Path(actual)
    tables = sorted(p.name for p in expected.iterdir() if p.is_dir())
    assert tables and tables == sorted(p.name for p in actual.iterdir() if p.is_dir()), tables
    for table in tables:
        a, b = read_table(expected, table), read_table(actual, table)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), table
        for col in a.columns:
            left, right = a[col].to_numpy(), b[col].to_numpy()
            if left.dtype == object:
                assert all(np.array_equal(x, y) for x, y in zip(left, right)), (table, col)
            else:
                assert (left == right).all(), (table, col)
    assert read_manifest(expected)["done"] == read_manifest(actual)["done"]


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        assert_same_results(sys.argv[2], sys.argv[3])
        print(f"same rows and values: {sys.argv[2]} and {sys.argv[3]}")
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
