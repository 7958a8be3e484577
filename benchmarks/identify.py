"""Throughput of the full class-embedding projection against timm's plain forward.

The projection covers 3 sites (block, attn, mlp outputs) x all blocks x all tokens, with
ranks, target logits, top-5 ids and the stream target logits, exactly as
`hooked-vit identify` computes them. Contenders are interleaved in every repeat and
medians are quoted, so machine noise hits both alike.

    python benchmarks/identify.py --model vit_base_patch16_224 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch

from circuits.projection import project_batch
from circuits.runs.precision import DTYPES, parse_dtype
from hooked_vit import HookedViT


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and images")
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype)
    timm_model = timm.create_model(args.model, pretrained=False).eval().to(args.device, dtype)
    model = HookedViT.from_timm(timm_model)
    size = model.cfg.img_size
    x = torch.randn(args.batch_size, 3, *size, device=args.device, dtype=dtype)
    targets = torch.randint(0, model.cfg.n_classes, (args.batch_size,), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    contenders = {
        "timm forward": lambda: timm_model(x),
        "projection (3 sites, ranks + top-5)": lambda: project_batch(model, x, targets),
    }
    times = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in contenders.values():
                fn()
        names = list(contenders)
        for r in range(args.repeats):
            for name in names[r % 2:] + names[: r % 2]:  # alternate who goes first
                times[name].append(timed(contenders[name], sync))
    base = statistics.median(times["timm forward"])
    print(f"{args.model}, batch {args.batch_size}, {args.device}, torch {torch.__version__}, "
          f"timm {timm.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    print(f"{'contender':40s} {'median s':>10s} {'images/s':>10s} {'x timm':>8s} {'paired':>8s}")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        # Median of the per-round ratios: robust to load drifting during the run.
        paired = statistics.median(t / b for t, b in zip(ts, times["timm forward"]))
        rows.append({"contender": name, "median_s": med, "images_per_s": args.batch_size / med,
                     "ratio": med / base, "paired_ratio": paired})
        print(f"{name:40s} {med:10.4f} {args.batch_size / med:10.1f} {med / base:8.2f} {paired:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
