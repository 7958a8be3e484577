#!/usr/bin/env python
"""Circuit-discovery cost: AtP over every head x position / MLP x position / residual
position and EAP over every edge, against one forward+backward of the model.

Contenders, interleaved round robin inside every repeat (medians quoted):

    fwd_bwd  one forward of the corrupted images with gradients and one backward of the
             batch-mean logit difference (the unit AtP and EAP are measured in)
    atp      attribution_patch, sites resid_pre, z, mlp_out (2 forwards + 1 backward)
    atp_qk   attribution_patch, sites q, k (plain AtP through the softmax)
    atp_star attribution_patch, sites q, k, qk_fix=True (AtP*: the pattern recomputed per
             patched query / key from the corrupted run's q and k; no extra forward)
    eap      edge_attribution over every edge (2 forwards + 1 backward)
    eap_ig   edge_attribution(method="eap-ig", ig_steps=5), for reference (7 + 5 passes)

    python benchmarks/circuit_discovery.py                         # embedded default, batch 64
    python benchmarks/circuit_discovery.py --model vit_small_patch16_224 --batch 8   # random weights
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from circuits.circuit_discovery import attribution_patch, corrupt, edge_attribution
from circuits.patching import logit_diff


def _model(spec: str):
    """The embedded models as trained; any timm name with random weights (timing does not
    depend on their values). Returns the model and its image side."""
    from circuits.runs.sources import load_model
    from circuits.runs.specs import parse_model_spec

    parsed = parse_model_spec(spec)
    model = load_model(spec, random_weights=parsed.kind == "timm")
    return model, model.cfg.img_size[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, size = _model(a.model)
    clean = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    corrupted = corrupt(clean, "shuffle")
    with torch.no_grad():
        ct, rt = model(clean).argmax(-1), model(corrupted).argmax(-1)

    def fwd_bwd():
        logit_diff(model(corrupted), ct, rt).mean().backward()
        model.zero_grad(set_to_none=True)

    contenders = {
        "fwd_bwd": fwd_bwd,
        "atp": lambda: attribution_patch(model, clean, corrupted),
        "atp_qk": lambda: attribution_patch(model, clean, corrupted, sites=["q", "k"]),
        "atp_star": lambda: attribution_patch(model, clean, corrupted, sites=["q", "k"], qk_fix=True),
        "eap": lambda: edge_attribution(model, clean, corrupted),
        "eap_ig": lambda: edge_attribution(model, clean, corrupted, method="eap-ig", ig_steps=5),
    }
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(a.repeats + 1):  # round 0 warms up
        for k in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            contenders[k]()
            if r:
                times[k].append(time.perf_counter() - t)
    n_edges = int(edge_attribution(model, clean[:2], corrupted[:2]).mask.sum())
    base = statistics.median(times["fwd_bwd"])
    print(f"model {a.model}  batch {a.batch}  edges {n_edges}  threads {torch.get_num_threads()}  repeats {a.repeats}")
    for k in names:
        med = statistics.median(times[k])
        print(f"{k:8s} {1e3 * med:9.1f} ms   x{med / base:5.2f} of one forward+backward")


if __name__ == "__main__":
    main()
