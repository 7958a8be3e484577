"""`hooked-vit memories` and `hooked-vit probe`: key-value memories and linear probes over a dataset
(Vilas et al. 2023)."""

from __future__ import annotations

import argparse

from circuits.commands._common import add_model_args, add_run_args, load_inputs, positive_int, run_options, say_done

ORDER = 30

def add_parser(sub) -> None:
    p = sub.add_parser("memories", help="key-value memories of attention and MLP layers over a dataset",
                       description="Key-value agreement, composition and class-value agreement of the "
                                   "attention and MLP memories (Vilas et al. 2023); results as parquet.")
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--sublayers", nargs="+", default=["attn", "mlp"], choices=["attn", "mlp"])
    p.add_argument("--topk", type=positive_int, default=5, help="memories per token and per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-class baseline")
    p.set_defaults(run=run_memories)

    p = sub.add_parser("probe", help="linear probes per token position vs the projection",
                       description="Ridge probes (alpha 1, +1/-1 targets) per site, layer and token position, "
                                   "trained on a few images per class and compared with the projection "
                                   "onto the class embedding space on held-out images.")
    add_model_args(p)
    add_run_args(p, target=False)  # probes are trained and scored on the labels
    p.add_argument("--per-class", type=positive_int, default=10, help="training images per class")
    p.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    p.add_argument("--sites", nargs="+", default=["block", "attn", "mlp"])
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="only these layers (bounds memory for large models: about positions * (8 * d_model^2 "
                        "+ 12 * d_model * classes) bytes per site and layer, float64 X^T X and X^T Y plus "
                        "float32 probes; ViT-B/16 with 1000 classes: 2.7 GB per site and layer, 104 GB for the defaults; the run "
                        "refuses up front when the estimate exceeds the available memory)")
    p.add_argument("--train-data", default=None,
                   help="training images (same syntax as --data); default: the synthetic train split when "
                        "--data is synthetic, else --data itself with the training images left out of the test")
    p.set_defaults(run=run_probe)

def run_memories(args: argparse.Namespace) -> int:
    from circuits.runs.memories import memories

    model, dataset, _ = load_inputs(args)
    store = memories(model, dataset, args.out, sublayers=args.sublayers, k=args.topk,
                     seed=args.seed, **run_options(args))
    say_done(store)
    return 0

def run_probe(args: argparse.Namespace) -> int:
    from circuits.runs.probe import run_probes
    from circuits.runs.sources import load_dataset
    from circuits.runs.specs import parse_data_spec

    from hooked_vit.layers import layer_indices

    model, test, spec = load_inputs(args)
    if args.layers is not None:
        args.layers = layer_indices(args.layers, model.cfg.n_layers, "--layers")
    train_spec = args.train_data
    if train_spec is None and parse_data_spec(args.data).is_synthetic:
        # Enough synthetic training images that every class has --per-class of them.
        train_spec = f"synthetic:train:{max(4 * args.per_class * model.cfg.n_classes, 100)}"
    train = test if train_spec is None else load_dataset(train_spec, model, spec, labels=args.labels)
    store = run_probes(model, train, test, args.out, per_class=args.per_class, alpha=args.alpha, sites=args.sites,
                       layers=args.layers, **run_options(args))
    say_done(store)
    return 0
