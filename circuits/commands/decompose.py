"""`hooked-vit decompose`: component scores and spurious-feature removal over a dataset
(Balasubramanian et al. 2024)."""

from __future__ import annotations

import argparse
import json

from circuits.commands._common import add_model_args, add_run_args, add_text_args, load_inputs, load_text_inputs, non_negative_int, positive_int, run_options, say_done

DEFAULT_REFERENCE = "synthetic:val:512"  # the embedded default's held-out split
ORDER = 40

def add_parser(sub) -> None:
    p = sub.add_parser(
        "decompose", help="decompose the representation into components; score them; remove a spurious feature",
        description="Exact component decomposition of the final representation (heads, MLPs, biases). Feature "
                    "directions and component scores come from a held-out reference set with class and attribute "
                    "labels; the components that carry the attribute (e.g. the background) more than the class "
                    "are mean-ablated and group accuracies are reported before and after.")
    add_model_args(p)
    add_run_args(p, target=False)  # components are scored against the core key
    p.add_argument("--reference", default=None,
                   help="held-out reference set (same spec forms as --data); default: " + DEFAULT_REFERENCE)
    p.add_argument("--reference-limit", type=positive_int, default=512, help="reference images (held in memory)")
    p.add_argument("--core-key", default="label", help="item key of the core feature (the class)")
    p.add_argument("--spurious-key", default="background", help="item key of the spurious attribute")
    p.add_argument("--max-k", type=positive_int, default=10, help="largest number of ablated components tried")
    p.add_argument("--mode", choices=["correlation", "covariance"], default="correlation")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--heatmaps", type=non_negative_int, default=4, help="images with token heatmaps in the report")
    add_text_args(p)
    p.add_argument("--text-k", type=positive_int, default=5, help="components kept per text for text retrieval")
    p.add_argument("--text-top", type=positive_int, default=10, help="best images listed per text in summary.json")
    p.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    from circuits.runs.decompose import decompose_run
    from circuits.runs.texts import read_texts

    texts = read_texts(args.texts, args.text_file)
    if texts:
        model, dataset, spec, directions = load_text_inputs(args, texts)
    else:
        (model, dataset, spec), directions = load_inputs(args), None
    reference = _reference(args, model, spec)
    store = decompose_run(model, dataset, reference, args.out, core_key=args.core_key,
                          spurious_key=args.spurious_key, max_k=args.max_k, mode=args.mode,
                          start_layer=args.start_layer, reference_limit=args.reference_limit,
                          n_heatmaps=args.heatmaps, texts=texts, text_directions=directions, text_k=args.text_k,
                          text_top=args.text_top, **run_options(args))
    summary = json.loads((store.root / "summary.json").read_text())
    b, a = summary["before"], summary["after"]
    if not json.loads((store.root / "reference.json").read_text())["order"]:
        print(f"no {args.spurious_key!r} attribute in the reference items: class scores only; accuracy {b['accuracy']:.3f}")
    else:
        print(f"worst-group accuracy {b['worst_group']:.3f} -> {a['worst_group']:.3f}, average-group "
              f"{b['avg_group']:.3f} -> {a['avg_group']:.3f} (ablated {', '.join(summary['ablated']) or 'nothing'})")
    for row in summary.get("texts", []):
        best = ", ".join(str(im["index"]) for im in row["images"][:5])
        print(f"{row['text']!r}: components {', '.join(row['components'])}; best images {best}")
    say_done(store)
    return 0


def _reference(args: argparse.Namespace, model, spec):
    """The reference set of --reference (default: the synthetic val split); a failure names
    the option, so it is not read as a problem with --data."""
    from circuits.runs.sources import load_dataset
    from hooked_vit.errors import UserError

    text = args.reference or DEFAULT_REFERENCE
    try:
        return load_dataset(text, model, spec, labels=args.labels if args.reference else None)
    except UserError as err:
        default = "" if args.reference else " (the default, as no --reference was given)"
        raise UserError(f"--reference {text}{default}: {err}; pass --reference with a held-out set of "
                        f"labelled images for this model (same forms as --data)") from None
