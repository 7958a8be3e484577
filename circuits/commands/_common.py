"""Arguments and messages shared by the subcommands."""

from __future__ import annotations

import argparse

import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="embedded[:default|:spurious], a timm model name, or a checkpoint file (with --arch)")
    p.add_argument("--arch", default=None,
                   help="timm architecture of a checkpoint file, with optional constructor overrides: "
                        "vit_base_patch16_224 or vit_tiny_patch16_224:depth=6,img_size=64")
    p.add_argument("--random-weights", action="store_true", help="the same architecture, freshly initialised")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="synthetic[:split[:n]], an ImageNet-S root, or an ImageFolder directory")
    p.add_argument("--out", required=True, help="output directory for the results (resumable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")


def say_done(store) -> None:
    skipped = store.skipped
    print(f"results in {store.root} ({len(store.done)} items done, {len(skipped)} skipped)")
    for rec in skipped[:20]:
        print(f"  skipped {rec['index']} {rec.get('path', '')}: {rec.get('reason', '')}")


def load_inputs(args: argparse.Namespace, data: str | None = None):
    """The model and dataset of `--model/--arch/--random-weights` and `--data` (or `data`),
    each spec parsed once; returns (model, dataset, model spec)."""
    from circuits.runs.sources import load_dataset, load_model
    from circuits.runs.specs import parse_data_spec, parse_model_spec

    spec = parse_model_spec(args.model, args.arch, args.random_weights)
    data_spec = parse_data_spec(args.data if data is None else data)
    model = load_model(spec, device=args.device)
    return model, load_dataset(data_spec, model, spec), spec
