#!/usr/bin/env python
"""What a low-precision run changes: bf16 / fp16 against fp32 on the same images.

For the embedded default model (or a timm name, random weights) on the synthetic test
images, per dtype: the final logits' max error relative to the largest fp32 logit, top-1
agreement; for the class-embedding projection of `identify` (3 sites x every block x every
token) the share of token ranks equal to fp32's, and the identifiable-token rate (rank 0)
in both; for GAE (a gradient method of `explain`) the mean per-image Spearman correlation
of the maps with fp32's.

    python benchmarks/precision.py                     # CPU: bf16 (fp16 where supported)
    python benchmarks/precision.py --device cuda --dtypes bf16 fp16 --n 512 --json precision.json
"""

from __future__ import annotations

import argparse
import json

import torch
from scipy.stats import spearmanr

from circuits.explain.methods import explain
from circuits.projection import project_batch
from circuits.runs.precision import parse_dtype
from circuits.runs.sources import load_model, synthetic_for
from circuits.runs.specs import parse_model_spec


def deviation(ref: dict, low: dict) -> dict:
    """Figures of one dtype's outputs against fp32's (both on CPU, float)."""
    scale = float(ref["logits"].abs().max())
    rho = [spearmanr(a, b).statistic for a, b in zip(ref["gae"].numpy(), low["gae"].numpy())]
    return {
        "logit_max_rel_error": float((low["logits"] - ref["logits"]).abs().max()) / scale,
        "top1_agreement": float((low["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean()),
        "token_rank_agreement": float((low["rank"] == ref["rank"]).float().mean()),
        "identifiable_rate_fp32": float((ref["rank"] == 0).float().mean()),
        "identifiable_rate": float((low["rank"] == 0).float().mean()),
        "gae_spearman_mean": float(torch.tensor(rho).nanmean()),
    }


def outputs(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict:
    parts: dict[str, list] = {"logits": [], "rank": [], "gae": []}
    dtype = model.embed.proj.weight.dtype
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(model.device, dtype)
        t = labels[start:start + batch_size].to(model.device)
        proj = project_batch(model, x, t)
        parts["logits"].append(proj.logits.float().cpu())
        parts["rank"].append(proj.rank.cpu())
        parts["gae"].append(explain("gae", model, x, t).float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="an embedded model (embedded, embedded:spurious): the "
                                                        "synthetic images it is measured on are theirs")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    p.add_argument("--n", type=int, default=256, help="synthetic test images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    spec = parse_model_spec(args.model)
    if spec.kind != "embedded":
        p.error(f"--model {args.model}: precision is measured on the synthetic images of an embedded model")
    data = synthetic_for(spec.name, "test", args.n)
    items = [data[i] for i in range(args.n)]
    images = torch.stack([it["image"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    ref = outputs(load_model(args.model, device=args.device), images, labels, args.batch_size)
    rows = {}
    for name in args.dtypes:
        try:
            low = outputs(load_model(args.model, device=args.device, dtype=parse_dtype(name)), images, labels,
                          args.batch_size)
        except RuntimeError as err:  # e.g. an fp16 kernel missing on this CPU
            print(f"{name}: not measured on {args.device} ({str(err).splitlines()[0]})")
            continue
        rows[name] = deviation(ref, low)
        print(name, json.dumps({k: round(v, 5) for k, v in rows[name].items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "device": args.device, "dtypes": rows}, f, indent=2)


if __name__ == "__main__":
    main()
