"""Throughput of the SAE pipeline on the embedded default: activations/s written by the
store, training rows (tokens)/s, and the store's peak RSS for two dataset sizes.

    PYTHONPATH=. python benchmarks/sae.py [--device cuda] [--images 2000] [--steps 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.embedded import SyntheticShapes, normalize  # noqa: E402
from circuits.runs.activation_store import build_activation_store  # noqa: E402
from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary  # noqa: E402
from circuits.sae.train import TrainConfig, train_dictionary  # noqa: E402
from circuits.runs.sources import load_model  # noqa: E402

HOOK = "blocks.3.hook_resid_post"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=1024)
    p.add_argument("--memory", action="store_true", help="also measure peak RSS for 128 and 2560 images")
    args = p.parse_args()
    model = load_model("embedded", device=args.device)
    data = SyntheticShapes(args.images, seed=0, split="train", transform=normalize)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_activation_store(model, data, Path(tmp) / "store", [HOOK], batch_size=100, progress=False)
        store_s = time.perf_counter() - t0
        rows = len(store)
        sae = SparseDictionary(DictionaryConfig(64, args.d_sae, "topk", k=16, hook_name=HOOK))
        t0 = time.perf_counter()
        train_dictionary(sae, lambda e: store.batches(args.train_batch, seed=e),
                         TrainConfig(steps=args.steps, device=args.device), progress=False)
        train_s = time.perf_counter() - t0
    print(f"device {args.device}, {torch.get_num_threads()} threads")
    print(f"store: {rows} activations in {store_s:.1f} s = {rows / store_s:,.0f} activations/s "
          f"(includes rendering the synthetic images)")
    print(f"train: TopK d_sae={args.d_sae}, batch {args.train_batch}: "
          f"{args.steps * args.train_batch / train_s:,.0f} tokens/s ({args.steps} steps in {train_s:.1f} s)")
    if args.memory:
        from tests.test_sae_store import peak_rss_mib

        with tempfile.TemporaryDirectory() as tmp:
            small, large = peak_rss_mib(128, Path(tmp) / "s"), peak_rss_mib(2560, Path(tmp) / "l")
        print(f"store peak RSS: {small:.0f} MiB (128 images) vs {large:.0f} MiB (2560 images)")


if __name__ == "__main__":
    main()
