"""`hooked-vit explain`: explanation maps benchmarked over a dataset."""

from __future__ import annotations

import argparse

from circuits.commands._common import add_model_args, add_run_args, load_inputs, non_negative_int, run_options, say_done

ORDER = 50

def add_parser(sub) -> None:
    from circuits.method_names import DEFAULT_METHODS, METHOD_NAMES as METHODS  # no torch: --help stays fast

    p = sub.add_parser("explain", help="explanation maps and their benchmarks over a dataset",
                       description="Explain every image with each method, then the segmentation test (datasets "
                                   "with masks), positive / negative perturbation and keep-the-most-important "
                                   f"AUCs. Methods: {', '.join(METHODS)}; options as name:key=value "
                                   "(e.g. tokentm:necc=none).")
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods or name:key=value specs")
    p.add_argument("--mode", choices=["remove", "zero"], default="remove",
                   help="perturb by dropping tokens (remove) or zeroing their pixels (zero)")
    p.add_argument("--thumbnails", type=non_negative_int, default=4, help="images kept for the report's map overlays")
    p.add_argument("--sanity-images", type=non_negative_int, default=16,
                   help="images for the model-parameter randomisation check (0: skip)")
    p.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    from circuits.explain import parse_method
    import json

    import pandas as pd

    from circuits.runs.explain import benchmark

    for spec in args.methods:  # before the (slow) model loading
        parse_method(spec)
    model, dataset, _ = load_inputs(args)
    store = benchmark(model, dataset, args.out, args.methods, mode=args.mode, thumbnails=args.thumbnails,
                      sanity_images=args.sanity_images, **run_options(args))
    say_done(store)
    summary = pd.DataFrame(json.loads((store.root / "summary.json").read_text()))  # what the run just wrote
    print(summary.drop(columns=["positive_curve", "negative_curve"]).to_string(index=False))
    return 0
