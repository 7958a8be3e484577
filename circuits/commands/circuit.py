"""`hooked-vit circuit`: edge attribution (EAP / EAP-IG), a pruned circuit and its faithfulness."""

from __future__ import annotations

import argparse
import json

from circuits.commands._common import add_class_text_args, add_model_args, add_video_args, load_inputs, positive_int

ORDER = 60


def add_parser(sub) -> None:
    from circuits.method_names import CIRCUIT_CORRUPTIONS, CIRCUIT_METRICS  # no torch: --help stays fast

    p = sub.add_parser("circuit", help="circuit discovery: edge scores, a pruned circuit, its faithfulness",
                       description="EAP or EAP-IG edge scores and AtP node scores over a dataset, the circuit of "
                                   "the --budget highest-|score| edges (or grown greedily from the logits) and the share of the "
                                   "metric it recovers.")
    add_model_args(p)
    p.add_argument("--data", default="synthetic",
                   help="synthetic[:split[:n]], an ImageNet-S root, or an ImageFolder; with a video model "
                        "moving_shapes[_static][:split[:n]] or a folder of video clips / frame folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", default="eap", choices=["eap", "eap-ig"])
    p.add_argument("--metric", default="logit_diff", choices=sorted(set(CIRCUIT_METRICS) - {"rank", "identifiability"}))
    p.add_argument("--corruption", default="shuffle", choices=sorted(CIRCUIT_CORRUPTIONS),
                   help="the corrupted run: another image of the batch (shuffle), blur, noise, the batch mean; "
                        "for clips also reverse_frames (played backwards), shuffle_frames, freeze_frames")
    p.add_argument("--budget", type=positive_int, default=20, help="edges kept in the circuit")
    p.add_argument("--greedy", action="store_true",
                   help="grow the circuit from the logits (every kept edge on a path to them) instead of top-|score|")
    p.add_argument("--ig-steps", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--limit", type=positive_int, default=64, help="only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    add_class_text_args(p)
    add_video_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from circuits.runs.circuit import circuit_run

    model, dataset, _ = load_inputs(args)
    summary = circuit_run(model, dataset, args.out, method=args.method, metric=args.metric,
                          corruption=args.corruption, budget=args.budget, limit=args.limit,
                          batch_size=args.batch_size, ig_steps=args.ig_steps, greedy=args.greedy,
                          overwrite=args.overwrite, progress=True)
    print(json.dumps(summary, indent=2))
    return 0
