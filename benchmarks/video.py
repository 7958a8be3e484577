#!/usr/bin/env python
"""Video forward benchmark: transformers' VideoMAEForVideoClassification vs HookedViT.

A VideoMAE-B-sized model with random weights (12 blocks, width 768, 12 heads, MLP 3072,
16 frames of 224 x 224, patch 16, tubelet 2: 8 x 14 x 14 = 1568 tokens, 400 classes as
Kinetics-400) is built in transformers, loaded into HookedViT (`HookedViT.from_hf`), and
three contenders run on the same random clips under ``torch.inference_mode()``,
interleaved round robin inside every repeat (the starting contender rotates), so machine
noise hits all of them alike:

    a  hf          transformers' forward (its default attention implementation)
    b  hooked      HookedViT forward with no hooks (SDPA attention, fused LayerNorm)
    c  cache_all   run_with_cache of every hook (the explicit attention and LayerNorm paths)

Reported per contender: the median time, the ratio of medians against hf, the median of
per-round ratios (paired), the bytes the cache holds (each storage once) and, on CUDA, the
peak extra allocation of one run. The logits of b and c are compared with a's first; the
script stops if b does not reproduce a. The timing, memory and machine helpers are
benchmarks/forward.py's.

    python benchmarks/video.py                          # VideoMAE-B, batch 1 and 2
    python benchmarks/video.py --device cuda --repeats 20 --json video.json
    python benchmarks/video.py --tiny --repeats 1       # a smoke run at a tiny size (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runnable from a checkout without installing the package
sys.path.insert(0, str(HERE))
from forward import cache_bytes, gib, loadavg, logits_of, machine_info, sync  # noqa: E402

CONTENDERS = ("hf", "hooked", "cache_all")
DESCRIPTIONS = {"hf": "transformers VideoMAEForVideoClassification forward",
                "hooked": "HookedViT forward, no hooks", "cache_all": "run_with_cache, every hook"}
# VideoMAE-B (MCG-NJU/videomae-base-finetuned-kinetics's architecture) and a tiny one for smoke runs.
SIZES = {
    "base": dict(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=768,
                 num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=400),
    "tiny": dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10),
}


def build(size: str, device: torch.device, seed: int, batch_size: int):
    """The transformers model (eval), the HookedViT loaded from it, and random clips [b, T, 3, H, W]."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    from hooked_vit import HookedViT

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(**SIZES[size], use_mean_pooling=True)
    hf = VideoMAEForVideoClassification(cfg).eval()
    hooked = HookedViT.from_hf(hf).eval()
    hf.to(device)
    hooked.to(device)
    g = torch.Generator().manual_seed(seed + 1)
    clips = torch.randn(batch_size, cfg.num_frames, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    return hf, hooked, clips


def make_contenders(hf, hooked, clips) -> dict[str, Callable[[], Any]]:
    return {"hf": lambda: hf(pixel_values=clips).logits, "hooked": lambda: hooked(clips),
            "cache_all": lambda: hooked.run_with_cache(clips, names_filter=None)}


def bench(size: str, batch_size: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    hf, hooked, clips = build(size, device, args.seed, batch_size)
    fns = make_contenders(hf, hooked, clips)
    record: dict[str, Any] = {"model": f"videomae-{size}", "device": str(device), "batch_size": batch_size,
                              "input_shape": list(clips.shape), "tokens": hooked.cfg.n_ctx,
                              "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
                              "loadavg_before": loadavg(), "contenders": {}}
    with torch.inference_mode():
        ref = fns["hf"]().float()
        scale = max(1.0, ref.abs().max().item())
        diffs, extra = {}, {}
        for name in ("hooked", "cache_all"):
            out = fns[name]()
            diffs[name] = (logits_of(out).float() - ref).abs().max().item()
            if name == "cache_all":
                held, naive = cache_bytes(out[1])
                extra[name] = {"cache_bytes": held, "cache_bytes_naive": naive, "n_cached": len(out[1])}
            del out
        record["max_abs_diff_vs_hf"] = diffs
        print(f"[videomae-{size} batch {batch_size} on {device}] max |logits - hf|: "
              + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()) + f"  (|hf logits| max {scale:.3g})", flush=True)
        if diffs["hooked"] > args.atol * scale:
            raise SystemExit(f"HookedViT does not reproduce transformers' VideoMAE: max abs diff {diffs['hooked']:.3g} "
                             f"> {args.atol * scale:.3g}; refusing to benchmark different computations")
        for _ in range(args.warmup):
            for name in CONTENDERS:
                out = fns[name]()
                sync(device)
                del out
        peaks: dict[str, int] = {}
        if device.type == "cuda":
            for name in CONTENDERS:
                gc.collect()
                torch.cuda.empty_cache()
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                out = fns[name]()
                sync(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) - base
                del out
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for r in range(args.repeats):
            for name in [CONTENDERS[(r + i) % len(CONTENDERS)] for i in range(len(CONTENDERS))]:
                sync(device)
                t0 = time.perf_counter()
                out = fns[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                del out
    record["loadavg_after"] = loadavg()
    base_med = statistics.median(times["hf"])
    for name in CONTENDERS:
        med = statistics.median(times[name])
        entry = {"description": DESCRIPTIONS[name], "median_s": med, "min_s": min(times[name]),
                 "ratio_vs_hf": med / base_med,
                 "paired_ratio_median": statistics.median(t / b for t, b in zip(times[name], times["hf"])),
                 "times_s": times[name], **extra.get(name, {})}
        if name in peaks:
            entry["cuda_peak_extra_bytes"] = peaks[name]
        record["contenders"][name] = entry
    del hf, hooked, clips, fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def format_table(records: list[dict[str, Any]]) -> str:
    cuda = any(r["device"].startswith("cuda") for r in records)
    header = ["model", "batch", "device", "contender", "median s", "ratio vs hf", "paired ratio", "cache GiB"]
    header += ["CUDA peak GiB"] if cuda else []
    rows = [header]
    for rec in records:
        for name, e in rec["contenders"].items():
            row = [rec["model"], str(rec["batch_size"]), rec["device"], name, f"{e['median_s']:.4f}",
                   f"{e['ratio_vs_hf']:.3f}", f"{e['paired_ratio_median']:.3f}", gib(e.get("cache_bytes"))]
            rows.append(row + ([gib(e.get("cuda_peak_extra_bytes"))] if cuda else []))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny VideoMAE (2 blocks, width 32, 4 frames of 32 px) for smoke runs")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--atol", type=float, default=1e-4, help="allowed |logits - hf| relative to max |hf logits|")
    p.add_argument("--json", default=None, help="write every record and the machine info here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--repeats and --batch-sizes must be >= 1, --warmup >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = "tiny" if args.tiny else "base"
    records = [bench(size, b, device, args) for b in args.batch_sizes]
    print(format_table(records))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "records": records}, indent=1))
        print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
