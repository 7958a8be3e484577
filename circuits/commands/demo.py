"""`hooked-vit demo` and `hooked-vit train-embedded`: the embedded default end to end."""

from __future__ import annotations

from circuits.commands._common import positive_int

import argparse

ORDER = 95


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default",
                       description="Every analysis, small, on the embedded synthetic dataset and model, then a "
                                   "report: identify, perturb, memories and probes, decompose, explain, circuit "
                                   "(EAP, 20 edges, 64 images), sae (a 256-wide top-k SAE trained 300 steps, "
                                   "evaluated, features studied) and textspan (the embedded model has no text "
                                   "tower: its class names with their logit directions stand in for CLIP "
                                   "prompts), and video (the embedded video models on moving-shapes clips: space-time "
                                   "identifiability, a motion circuit, no cross-frame attention on the motion model "
                                   "and its static control). No downloads; resumable.")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--n", type=positive_int, default=512, help="test images")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: the embedded model is tiny, and extra threads "
                        "only wait on each other, badly so when other processes share the cores)")
    p.set_defaults(run=run_demo)

    p = sub.add_parser("train-embedded", help="retrain the embedded default models",
                       description="Retrain an embedded synthetic-shapes ViT (see circuits.embedded.train).")
    p.add_argument("--which", default="default", choices=["default", "spurious"])
    p.add_argument("--out", default=None, help="output directory (default: the shipped weights)")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(run=run_train)


def run_demo(args: argparse.Namespace) -> int:
    from circuits.report.demo import run_demo as demo

    report = demo(args.out, n=args.n, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                  threads=args.threads)
    print(f"demo report: {report}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from circuits.embedded import train_embedded

    kwargs = {"out_dir": args.out} if args.out else {}
    print(f"wrote {train_embedded(args.which, epochs=args.epochs, seed=args.seed, **kwargs)}")
    return 0
