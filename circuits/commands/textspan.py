"""`hooked-vit textspan`: describe CLIP attention heads by the texts their outputs span
(Gandelsman et al. 2024)."""

from __future__ import annotations

import argparse

from circuits.commands._common import add_model_args, add_run_args, add_text_args, load_text_inputs, positive_int, run_options, say_done

ORDER = 45


def add_parser(sub) -> None:
    p = sub.add_parser(
        "textspan", help="describe CLIP attention heads by the texts their outputs span (TextSpan)",
        description="TextSpan (Gandelsman et al. 2024, arXiv:2310.05916): each head's direct contribution to the "
                    "image embedding over a dataset; per head, greedily the prompts whose text directions explain "
                    "most of its variance. Needs a CLIP model with its text tower (open_clip:ARCH:TAG or "
                    "hf:FOLDER of a CLIPModel). Writes textspan.parquet (layer, head, rank, text, "
                    "explained_variance) and summary.json.")
    add_model_args(p)
    add_run_args(p, target=False)  # heads are described over the images, for no class
    add_text_args(p, required=True)
    p.add_argument("--layers", default=None, help="comma-separated blocks to describe (default: the last four)")
    p.add_argument("--k", type=positive_int, default=5, help="texts chosen per head")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from circuits.runs.texts import read_texts
    from circuits.runs.textspan import textspan_run
    from hooked_vit.errors import UserError

    texts = read_texts(args.texts, args.text_file)
    if not texts:
        raise UserError("textspan needs prompts for a CLIP model's text tower: --texts \"a,b\" or --text-file FILE")
    layers = None if args.layers is None else _layers(args.layers)
    model, dataset, _, directions = load_text_inputs(args, texts)
    if layers is not None:
        from hooked_vit.layers import layer_index

        layers = [layer_index(l, model.cfg.n_layers, "--layers") for l in layers]
    store = textspan_run(model, dataset, args.out, texts, directions,
                         layers=layers, k=args.k, **run_options(args))
    import json

    for row in json.loads((store.root / "summary.json").read_text())["heads"]:
        print(f"L{row['layer']}H{row['head']} ({row['explained_variance']:.2f}): {'; '.join(row['texts'])}")
    say_done(store)
    return 0


def _layers(text: str) -> list[int]:
    from hooked_vit.errors import UserError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--layers {text!r}: give comma-separated block numbers, e.g. 10,11") from None
