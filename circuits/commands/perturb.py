"""`hooked-vit perturb`: attention perturbations and token removal over a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from circuits.commands._common import add_mask_sampling_arg, add_model_args, add_run_args, add_video_args, load_inputs, run_options, say_done

ORDER = 20

def add_parser(sub) -> None:
    p = sub.add_parser(
        "perturb", help="attention perturbations (self_only, no_cls, no_cross_frame) and token removal over a dataset",
        description="Identifiable-token rate at the last block under attention perturbations (always with "
                    "the unperturbed baseline) and after removing context or object tokens (needs masks).")
    add_model_args(p)
    add_run_args(p, video=True)
    add_video_args(p)
    add_mask_sampling_arg(p)
    p.add_argument("--kinds", nargs="*", default=None, choices=["self_only", "no_cls", "no_cross_frame"],
                   help="attention perturbations (none to skip; default self_only no_cls, without no_cls on a "
                        "model with no prefix tokens); the unperturbed run is added. no_cross_frame (video "
                        "models): patch queries cannot attend to patches of other time positions")
    p.add_argument("--layers", nargs="+", type=int, default=None, help="blocks to perturb (default all)")
    p.add_argument("--perturb-prefix-queries", action="store_true",
                   help="also perturb register / distillation query rows (default: patch tokens only)")
    p.add_argument("--keys", default="class", choices=["class", "prefix"],
                   help="no_cls: cut only the class token, or every prefix token, as a key")
    p.add_argument("--removal", nargs="*", default=None, choices=["context", "class_label"],
                   help="token removals (none to skip): context keeps object tokens, class_label keeps background "
                        "(default: both on image models; video models: not offered yet)")
    p.add_argument("--convention", default="ours", choices=["ours", "original"],
                   help="rates printed: ours (image tokens, per image) or the reference code's (class token "
                        "counted in perturbed runs; docs/class_identifiability.md). Read-time only: both come "
                        "from the same stored ranks, so it is not a run setting")
    p.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    from hooked_vit.layers import layer_indices

    model, dataset, _ = load_inputs(args)
    args.removal = removals(args.removal, model)
    if args.kinds is None:
        args.kinds = ["self_only", "no_cls"] if model.cfg.n_prefix_tokens else ["self_only"]
        if not model.cfg.n_prefix_tokens:
            print(f"no_cls: {model.cfg.model_name} has no class token or registers to cut, skipped")
    if args.layers is not None:
        args.layers = layer_indices(args.layers, model.cfg.n_layers, "--layers")
    if args.removal:
        require_masks(dataset, args.data)  # before the attention half runs, not after it
    out = Path(args.out)
    options = run_options(args)
    if args.kinds:
        kwargs = {"perturb_prefix_queries": True} if args.perturb_prefix_queries else {}
        if args.keys == "prefix" or not model.cfg.class_token:  # no class token: cut the registers
            kwargs["keys"] = "prefix"
        _attention(model, dataset, out / "attention", ["none", *args.kinds], args.layers, options, kwargs,
                   args.convention)
    if args.removal:
        from circuits.runs.perturb import removal_rates_by_convention, token_removal_experiment

        store = token_removal_experiment(model, dataset, out / "token_removal", args.removal, **options)
        table = removal_rates_by_convention(store.read("removal"), model.cfg.n_prefix_tokens, args.convention)
        print(table.to_string(index=False))
        say_done(store)
    return 0


def removals(asked: list[str] | None, model) -> list[str]:
    """--removal: both removals by default on an image model; a video model runs none (said on
    one line) and refuses any asked for (token removal by frame or tube is not adapted yet)."""
    from hooked_vit.errors import UserError

    if not model.cfg.is_video:
        return ["context", "class_label"] if asked is None else asked
    if asked:
        raise UserError(f"--removal {' '.join(asked)}: token removal is not offered for video models yet "
                         "(docs/video.md); pass --removal with nothing, or leave it out")
    if asked is None:
        print("token removal: not offered for video models yet, skipped (docs/video.md)")
    return []


def require_masks(dataset, data: str) -> None:
    """Token removal needs object masks: refuse a dataset without them before anything runs."""
    from hooked_vit.errors import UserError

    first = next((item for item in map(dataset.__getitem__, range(min(len(dataset), 8))) if item is not None), None)
    if first is None or "mask" not in first:
        raise UserError(f"token removal needs object masks and --data {data} has none: use synthetic or an "
                         "ImageNet-S root, or pass --removal with nothing to skip it")


def _attention(model, dataset, out, kinds, layers, options, kwargs, convention) -> None:
    from circuits.interventions import summarize_rates
    from circuits.runs.perturb import perturbation_experiment, perturbation_rates

    runs = perturbation_experiment(model, dataset, out, kinds, layers, **options, **kwargs)
    print(summarize_rates(perturbation_rates(runs, convention)).to_string(index=False))
    print(f"results in {out}")
