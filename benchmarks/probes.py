"""Time of the ridge solve behind `circuits.probes` (one probe per token position).

`spd_solve` (Cholesky) on a batch of `--positions` systems of size `--d` with `--classes`
right-hand sides, float64, as `RidgeAccumulator.solve` calls it for one (site, layer):
ViT-B/32 defaults (50 positions, d_model 768, 1000 classes), 2 threads (the setting under
which the former batched `torch.linalg.solve` hung). Random scatter matrices from `--rows`
training rows: the time does not depend on the values.

    python benchmarks/probes.py
    python benchmarks/probes.py --positions 197 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from circuits.probes import spd_solve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=50, help="token positions = batched systems (50: ViT-B/32)")
    p.add_argument("--d", type=int, default=768, help="d_model")
    p.add_argument("--classes", type=int, default=1000, help="right-hand sides")
    p.add_argument("--rows", type=int, default=100, help="training rows behind each scatter matrix")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(args.positions, args.rows, args.d, dtype=torch.float64, generator=gen)
    S = X.transpose(1, 2) @ X
    B = torch.randn(args.positions, args.d, args.classes, dtype=torch.float64, generator=gen)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        W = spd_solve(S, B, 1.0)
        times.append(time.perf_counter() - start)
    residual = float((S @ W + W - B).abs().max())
    print(f"spd_solve (Cholesky) {args.positions} x {args.d}x{args.d}, {args.classes} rhs, float64, "
          f"{torch.get_num_threads()} threads: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, {args.repeats} repeats), max residual {residual:.1e}")


if __name__ == "__main__":
    main()
