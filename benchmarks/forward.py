#!/usr/bin/env python
"""Forward-pass benchmark: timm vs HookedViT (no hooks, residual cache, full cache).

For each model the timm model (eval mode) and the HookedViT built from it run on the
same random input under ``torch.inference_mode()``. Four contenders are timed,
interleaved round robin inside every repeat (the starting contender rotates from one
repeat to the next) so machine noise hits all of them alike:

    a  timm           timm's plain forward
    b  hooked         HookedViT forward with no hooks (SDPA attention, fused LayerNorm)
    c  cache_resid    run_with_cache of every hook_resid_pre / hook_resid_mid / hook_resid_post
    d  cache_all      run_with_cache of every hook (names_filter=None); caching the attention
                      pattern / scores and the LayerNorm scale forces the explicit attention
                      and LayerNorm paths

Reported per contender: the median time, the ratio of medians against timm, the median
of per-repeat ratios (paired: both numbers come from the same round), and for the
caching contenders the bytes held by the cached tensors (each storage counted once:
hook_q/k/v are views of one qkv buffer; expanded position embeddings are a parameter's
storage). On CUDA the peak extra allocation of one run (``torch.cuda.max_memory_allocated``
minus what was allocated before it) is reported as well.

Before timing, the logits of b, c and d are compared with timm's (max abs diff); the
script stops if b does not reproduce a, so it never silently compares two different
computations.

Random weights are used (``pretrained=False``): timing does not depend on the values.

    python benchmarks/forward.py                      # ViT-B/16 and B/32, batch 8
    python benchmarks/forward.py --families           # SigLIP-B/16, EVA02-B/14, DINOv3-B/16 (issue 24)
    python benchmarks/forward.py --models vit_small_patch16_224 --repeats 5 --json out.json

Each model ends with one summary line: hooked / timm and cache_all / timm (ratio of medians;
paired median in brackets), the figures the issue-24 bar (1.05x) is about.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from circuits.runs.precision import DTYPES  # noqa: E402  (after the path is set)

RESID_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
CONTENDERS = ("timm", "hooked", "cache_resid", "cache_all")
# The newer families of issue 24: MAP head; RoPE + SwiGLU + sub-LN; RoPE + registers + LayerScale.
FAMILY_MODELS = ("vit_base_patch16_siglip_224", "eva02_base_patch14_224", "vit_base_patch16_dinov3")
DESCRIPTIONS = {
    "timm": "timm forward",
    "hooked": "HookedViT forward, no hooks",
    "cache_resid": "run_with_cache, resid_pre/mid/post",
    "cache_all": "run_with_cache, every hook",
}


# ------------------------------------------------------------------------------ helpers
def resid_filter(name: str) -> bool:
    return name.endswith(RESID_SUFFIXES)


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(bytes held by distinct storages, naive sum of numel * element_size) of a cache."""
    values = cache.cache_dict.values() if hasattr(cache, "cache_dict") else cache.values()
    seen: dict[tuple[str, int], int] = {}
    naive = 0
    for t in values:
        if not torch.is_tensor(t):
            continue
        naive += t.numel() * t.element_size()
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values()), naive


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except Exception:  # pragma: no cover - timm is a dependency
        pass
    try:
        from importlib.metadata import version

        info["transformer_lens"] = version("transformer_lens")
    except Exception:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------ benchmark


def build(model_name: str, device: torch.device, seed: int, batch_size: int, dtype: str = "fp32",
          depth: Optional[int] = None):
    import timm

    from hooked_vit import HookedViT

    torch.manual_seed(seed)
    overrides = {} if depth is None else {"depth": depth}
    timm_model = timm.create_model(model_name, pretrained=False, **overrides).eval()
    hooked = HookedViT.from_timm(timm_model).eval()
    timm_model.to(device, DTYPES[dtype])  # both models in the same dtype: ratios compare like with like
    hooked.to(device, DTYPES[dtype])
    h, w = timm_model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, h, w, generator=g).to(device, DTYPES[dtype])
    return timm_model, hooked, x


def make_contenders(timm_model, hooked, x) -> dict[str, Callable[[], Any]]:
    return {
        "timm": lambda: timm_model(x),
        "hooked": lambda: hooked(x),
        "cache_resid": lambda: hooked.run_with_cache(x, names_filter=resid_filter),
        "cache_all": lambda: hooked.run_with_cache(x, names_filter=None),
    }


def logits_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def bench_model(model_name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    timm_model, hooked, x = build(model_name, device, args.seed, args.batch_size, args.dtype, args.depth)
    fns = make_contenders(timm_model, hooked, x)
    record: dict[str, Any] = {
        "model": model_name,
        "device": str(device),
        "batch_size": args.batch_size,
        "input_shape": list(x.shape),
        "timm_fused_attn": bool(getattr(timm_model.blocks[0].attn, "fused_attn", False)),
        "loadavg_before": loadavg(),
        "contenders": {},
    }
    with torch.inference_mode():
        # --- correctness: b (and c, d) must compute what a computes
        ref = fns["timm"]().float()
        scale = max(1.0, ref.abs().max().item())
        diffs: dict[str, float] = {}
        extra: dict[str, dict[str, Any]] = {}
        for name in ("hooked", "cache_resid", "cache_all"):
            out = fns[name]()
            diffs[name] = (logits_of(out).float() - ref).abs().max().item()
            if name.startswith("cache"):
                held, naive = cache_bytes(out[1])
                extra[name] = {"cache_bytes": held, "cache_bytes_naive": naive, "n_cached": len(out[1])}
            del out
        record["max_abs_diff_vs_timm"] = diffs
        record["logits_absmax"] = scale
        print(
            f"[{model_name} on {device}] max |logits - timm|: "
            + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
            + f"  (|timm logits| max {scale:.3g})",
            flush=True,
        )
        if diffs["hooked"] > args.atol * scale:
            raise SystemExit(
                f"HookedViT does not reproduce timm for {model_name} on {device}: max abs diff "
                f"{diffs['hooked']:.3g} > {args.atol * scale:.3g}; refusing to benchmark different computations"
            )
        for name in ("cache_resid", "cache_all"):
            if diffs[name] > args.atol * scale:
                print(f"  warning: {name} logits differ from timm by {diffs[name]:.3g}", flush=True)

        # --- warmup, interleaved
        for _ in range(args.warmup):
            for name in CONTENDERS:
                out = fns[name]()
                sync(device)
                del out

        # --- peak memory per contender (CUDA only), one run each outside the timed loop
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

        # --- timed repeats, round robin with a rotating start
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        n = len(CONTENDERS)
        for r in range(args.repeats):
            order = [CONTENDERS[(r + i) % n] for i in range(n)]
            for name in order:
                sync(device)
                t0 = time.perf_counter()
                out = fns[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                del out
            if args.verbose:
                print(
                    f"  repeat {r + 1}/{args.repeats}: "
                    + "  ".join(f"{k} {times[k][-1]:.3f}s" for k in CONTENDERS),
                    flush=True,
                )
    record["loadavg_after"] = loadavg()

    base_med = statistics.median(times["timm"])
    for name in CONTENDERS:
        med = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times["timm"]))
        entry: dict[str, Any] = {
            "description": DESCRIPTIONS[name],
            "median_s": med,
            "min_s": min(times[name]),
            "ratio_vs_timm": med / base_med,
            "paired_ratio_median": paired,
            "times_s": times[name],
        }
        entry.update(extra.get(name, {}))
        if name in peaks:
            entry["cuda_peak_extra_bytes"] = peaks[name]
        record["contenders"][name] = entry
    del timm_model, hooked, x, fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# ------------------------------------------------------------------------------ output
def gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def format_table(records: list[dict[str, Any]]) -> str:
    any_cuda = any(r["device"].startswith("cuda") for r in records)
    header = ["model", "device", "contender", "median s", "ratio vs timm", "paired ratio", "cache GiB"]
    if any_cuda:
        header.append("CUDA peak GiB")
    rows = [header]
    for rec in records:
        for name, e in rec["contenders"].items():
            row = [
                rec["model"],
                rec["device"],
                name,
                f"{e['median_s']:.4f}",
                f"{e['ratio_vs_timm']:.3f}",
                f"{e['paired_ratio_median']:.3f}",
                gib(e.get("cache_bytes")),
            ]
            if any_cuda:
                row.append(gib(e.get("cuda_peak_extra_bytes")))
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {3, 4, 5, 6, 7}

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[1:]]
    return "\n".join(lines)


def summary_line(rec: dict[str, Any]) -> str:
    """hooked / timm and cache_all / timm of one model: ratio of medians (paired median)."""
    c = rec["contenders"]
    part = lambda name: f"{c[name]['ratio_vs_timm']:.3f} (paired {c[name]['paired_ratio_median']:.3f})"
    return f"  {rec['model']} on {rec['device']}: hooked/timm {part('hooked')}, cache_all/timm {part('cache_all')}"


# ------------------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time timm vs HookedViT forward passes (no hooks, residual cache, full cache), interleaved.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_base_patch32_224"],
                   help="timm model names (random weights)")
    p.add_argument("--families", action="store_true",
                   help="benchmark the newer families instead of --models: " + ", ".join(FAMILY_MODELS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=None,
                   help="build the models with this many blocks (a quick check of the script; timings are "
                        "quoted at the registered depth)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds; each runs every contender once")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--device", choices=["cpu", "cuda", "all"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="'all' runs cuda and cpu when CUDA exists, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's setting)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and input of both models (bf16/fp16: pass a looser --atol, e.g. 0.05)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="max |hooked - timm| logits allowed, times max(1, |timm logits|max)")
    p.add_argument("--verbose", action="store_true", help="print every repeat's times")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")

    info = machine_info()
    print(
        f"torch {info.get('torch')}  timm {info.get('timm')}  transformer_lens {info.get('transformer_lens')}  "
        f"threads {torch.get_num_threads()}  cpu {info.get('cpu_model')}  "
        + (f"gpu {info['gpu']}  " if "gpu" in info else "")
        + f"loadavg {loadavg()}",
        flush=True,
    )
    print(f"batch {args.batch_size}, {args.warmup} warmup + {args.repeats} timed interleaved rounds", flush=True)

    records = []
    models = list(FAMILY_MODELS) if args.families else args.models
    for dev in devices:
        for model_name in models:
            t0 = time.perf_counter()
            records.append(bench_model(model_name, torch.device(dev), args))
            print(summary_line(records[-1]), flush=True)
            print(f"  done in {time.perf_counter() - t0:.0f}s, loadavg {loadavg()}", flush=True)

    print()
    print(format_table(records))
    print()
    print("ratio vs timm = median(contender) / median(timm); paired ratio = median over rounds of the "
          "per-round ratio; cache GiB = bytes held by the cached tensors (shared storage once).")

    if args.json:
        result = {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": vars(args),
            "machine": info,
            "results": records,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
