"""`hooked-vit identify`: class identifiability over a dataset."""

from __future__ import annotations

import argparse

from circuits.commands._common import add_mask_sampling_arg, add_model_args, add_run_args, add_video_args, load_inputs, positive_int, run_options, say_done

ORDER = 10

def add_parser(sub) -> None:
    p = sub.add_parser("identify", help="project every token onto the classes over a dataset",
                       description="Class identifiability (logit lens) over a dataset; results as parquet.")
    add_model_args(p)
    add_run_args(p, video=True)
    add_video_args(p)
    add_mask_sampling_arg(p)
    p.add_argument("--sites", nargs="+", default=["block", "attn", "mlp"],
                   help="block, attn, mlp, or any per-block hook name")
    p.add_argument("--topk", type=positive_int, default=5)
    p.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    from circuits.runs.identify import identify

    model, dataset, _ = load_inputs(args)
    store = identify(model, dataset, args.out, sites=args.sites, k=args.topk, **run_options(args))
    say_done(store)
    return 0
