"""`torchrun sae train` (2 ranks, gloo on CPU) equals one process: the activation store written by 2
ranks holds the same shards as one process's, and the dictionary trained data-parallel on it equals
the one-process dictionary (same seed, same global batch) to 1e-4 after 100 steps; the store written
by 2 ranks, read by 1, trains to exactly the one-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuits.runs.activation_store import ActivationStore
from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.formats import load_dictionary
from circuits.sae.train import TrainConfig, train_dictionary

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.4.hook_resid_post"
TRAIN = ["sae", "train", "--data", "synthetic:train:48", "--batch-size", "16", "--steps", "100", "--d-sae", "64",
         "--k", "4", "--train-batch", "256", "--lr", "3e-3", "--dead-after-tokens", "2000", "--checkpoint-every", "50",
         "--device", "cpu", "--seed", "1"]


def sae_train(out: Path, nproc: int) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (torchrun if nproc else [sys.executable]) + ["-m", "circuits.cli", *TRAIN, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_train_the_one_process_dictionary(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    sae_train(one, 0)
    sae_train(two, 2)
    # the store: 3 image batches, written 2 + 1 by the two ranks, the same files as one process's
    shards = sorted(p.name for p in (one / "activations" / "shards").glob("shard-*.safetensors"))
    assert len(shards) == 3 and shards == sorted(p.name for p in (two / "activations" / "shards").glob("shard-*"))
    for name in shards:
        a, b = load_file(one / "activations" / "shards" / name), load_file(two / "activations" / "shards" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (two / "activations" / "manifest-rank00001.json").exists()
    # the dictionary: data-parallel over the global batch, equal to one process
    ref, par = load_dictionary(one), load_dictionary(two)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(par.state_dict()[name], value, rtol=1e-4, atol=1e-4, msg=name)
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["final"]["step"] == 100
    assert max(r["dead"] for r in summary["log"]) > 0  # AuxK and the all-reduced dead counters took part
    # the store written by 2 ranks, read by 1 process: exactly the one-process training
    cfg = json.loads((one / "training_config.json").read_text())
    store = ActivationStore(two / "activations")
    fresh = SparseDictionary(DictionaryConfig(64, 64, "topk", k=4, hook_name=HOOK), seed=1)
    train_dictionary(fresh, lambda epoch: store.batches(256, seed=1 + epoch), TrainConfig(**cfg), progress=False)
    for name, value in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[name].to(value.dtype), value), name
