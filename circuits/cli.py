"""`hooked-vit`: the command line, a thin layer over the `circuits` functions."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="embedded[:default|:spurious], a timm model name, or a checkpoint file (with --arch)")
    p.add_argument("--arch", default=None, help="timm architecture of a checkpoint file, with optional constructor overrides: "
                        "vit_base_patch16_224 or vit_tiny_patch16_224:depth=6,img_size=64")
    p.add_argument("--random-weights", action="store_true", help="the same architecture, freshly initialised")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="synthetic[:split[:n]], an ImageNet-S root, or an ImageFolder directory")
    p.add_argument("--out", required=True, help="output directory for the results (resumable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-vit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("identify", help="project every token onto the classes over a dataset",
                       description="Class identifiability (logit lens) over a dataset; results as parquet.")
    _model_args(p)
    _run_args(p)
    p.add_argument("--sites", nargs="+", default=["block", "attn", "mlp"],
                   help="block, attn, mlp, or any per-block hook name")
    p.add_argument("--topk", type=int, default=5)

    p = sub.add_parser("report", help="render results directories into one HTML report",
                       description="Self-contained HTML report (plotly) from one or more results directories.")
    p.add_argument("results", nargs="+", help="results directories (a run, or a folder of runs)")
    p.add_argument("--out", default="report.html")
    p.add_argument("--title", default="hooked-vit report")

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default",
                       description="Every analysis on the embedded synthetic dataset and model, then a report.")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--n", type=int, default=512, help="test images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("train-embedded", help="retrain the embedded default models",
                       description="Retrain an embedded synthetic-shapes ViT (see circuits.embedded.train).")
    p.add_argument("--which", default="default", choices=["default", "spurious"])
    p.add_argument("--out", default=None, help="output directory (default: the shipped weights)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    return parser


@command
def cmd_identify(args: argparse.Namespace) -> int:
    from circuits.identify import identify
    from circuits.sources import load_dataset, load_model

    model = load_model(args.model, args.arch, args.device, args.random_weights)
    dataset = load_dataset(args.data, model)
    store = identify(model, dataset, args.out, sites=args.sites, k=args.topk, batch_size=args.batch_size,
                     limit=args.limit, num_workers=args.workers, overwrite=args.overwrite)
    _say_done(store)
    return 0


@command
def cmd_report(args: argparse.Namespace) -> int:
    from circuits.report import build_report

    path = build_report(args.results, args.out, args.title)
    print(f"report written to {path}")
    return 0


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from circuits.demo import run_demo

    report = run_demo(args.out, n=args.n, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite)
    print(f"demo report: {report}")
    return 0


@command
def cmd_train_embedded(args: argparse.Namespace) -> int:
    from circuits.embedded import train_embedded

    kwargs = {"out_dir": args.out} if args.out else {}
    path = train_embedded(args.which, epochs=args.epochs, seed=args.seed, **kwargs)
    print(f"wrote {path}")
    return 0


def _say_done(store) -> None:
    skipped = store.skipped
    print(f"results in {store.root} ({len(store.done)} items done, {len(skipped)} skipped)")
    for rec in skipped[:20]:
        print(f"  skipped {rec['index']} {rec.get('path', '')}: {rec.get('reason', '')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        code = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"hooked-vit {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
