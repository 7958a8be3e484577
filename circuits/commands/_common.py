"""Arguments and messages shared by the subcommands.

Imports of torch, timm and the library happen inside the functions that run a command, so
`hooked-vit --help` answers at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The shared options of dataset-level commands and the keyword each becomes in the library call;
# tests/test_cli_options.py checks that every command showing one passes it on.
SHARED_RUN_OPTIONS = {"--batch-size": "batch_size", "--limit": "limit", "--workers": "num_workers",
                      "--overwrite": "overwrite", "--target": "target", "--mask-sampling": "mask_sampling"}


def positive_int(text: str) -> int:
    """argparse type of a count that must be >= 1 (--limit, --batch-size, ...)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0 (--workers, ...)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number >= {low}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="embedded[:default|:spurious], a timm name (or timm:NAME), hf:ID_OR_FOLDER, "
                        "open_clip:ARCH[:TAG], or a checkpoint file (with --arch)")
    p.add_argument("--arch", default=None,
                   help="timm architecture of a checkpoint file, with optional constructor overrides: "
                        "vit_base_patch16_224 or vit_tiny_patch16_224:depth=6,img_size=64; with --random-weights "
                        "on a timm name, that model's overrides (e.g. NAME:num_classes=10 gives a headless "
                        "tower a random classifier head)")
    p.add_argument("--random-weights", action="store_true",
                   help="the same architecture, freshly initialised (never touches the network)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps; auto: cuda when available")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights and activations (docs/scaling.md: measured deviation from fp32)")


# The commands that run on video models (`add_video_args`); every other one refuses them in one line.
VIDEO_COMMANDS = ("identify", "perturb", "circuit", "sae train", "sae eval")


def add_run_args(p: argparse.ArgumentParser, target: bool = True, video: bool = False) -> None:
    """video: the command runs on video models too (`add_video_args`), so --data names clips."""
    clips = (", moving_shapes[_static][:split[:n]] (video models) or a folder of video clips / frame folders"
             if video else "")
    p.add_argument("--data", default="synthetic",
                   help=f"synthetic[:split[:n]], an ImageNet-S root, or an ImageFolder directory{clips}")
    p.add_argument("--labels", default=None,
                   help="JSON {folder: class id} or CSV rows folder,class_id: class folders -> the model's classes")
    if target:
        p.add_argument("--target", default="label",
                       help="the class measured per image: label, predicted (the model's top-1, for "
                            "unlabeled images) or a class id / name")
        add_class_text_args(p)
    p.add_argument("--out", required=True, help="output directory for the results (resumable)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--limit", type=positive_int, default=None, help="only N images: the first N synthetic ones; of image files, N spread over the classes (seeded, "
                        "recorded as limit_sample in the manifest)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loader worker processes (0: in the main process)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")


def add_video_args(p: argparse.ArgumentParser) -> None:
    """--num-frames for commands that run on video models (VIDEO_COMMANDS; docs/video.md)."""
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="video models: frames sampled per clip (default: the model's num_frames, the only "
                        "count its position table reads)")
    p.set_defaults(video=True)


def add_mask_sampling_arg(p: argparse.ArgumentParser) -> None:
    """--mask-sampling for commands that turn pixel masks into object / context tokens."""
    p.add_argument("--mask-sampling", default="center", metavar="center|corner|majority[:T]",
                   help="which patch tokens are object tokens: the patch's centre pixel (default), its "
                        "top-left pixel (the reference code's), or a share of object pixels >= T (0.5)")


def add_text_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--texts / --text-file: prompts read through the CLIP model's own text tower."""
    need = " (one of --texts / --text-file is needed)" if required else ""
    p.add_argument("--texts", default=None, help=f'comma-separated prompts, e.g. "a dog,a red car"{need}')
    p.add_argument("--text-file", default=None, help="a file of prompts, one per line ('#' lines skipped)")


def add_class_text_args(p: argparse.ArgumentParser) -> None:
    """--texts / --text-file as the classes of a class-space command (identify, perturb, explain,
    memories, circuit): a CLIP tower's classes are then those prompts (`install_text_classes`);
    without them such a tower is refused, as a headless model is."""
    p.add_argument("--texts", default=None,
                   help='CLIP models: comma-separated prompts that become the classes, e.g. "a dog,a red car"')
    p.add_argument("--text-file", default=None,
                   help="CLIP models: a file of class prompts, one per line ('#' lines skipped)")
    p.set_defaults(class_space=True)


def run_options(args: argparse.Namespace) -> dict:
    """The shared options of `add_run_args` as the library's keyword arguments."""
    options = {"batch_size": args.batch_size, "limit": args.limit, "num_workers": args.workers,
               "overwrite": args.overwrite}
    if hasattr(args, "target"):
        options["target"] = args.target
    if hasattr(args, "mask_sampling"):
        options["mask_sampling"] = args.mask_sampling  # parsed by load_inputs
    return options


def say_done(store) -> None:
    skipped = store.skipped
    print(f"results in {store.root} ({len(store.done) - len(skipped)} items done, {len(skipped)} skipped)")
    for rec in skipped[:20]:
        print(f"  skipped {rec['index']} {rec.get('path', '')}: {rec.get('reason', '')}")


def resolve_device(device: str) -> str:
    """--device auto -> cuda when available; a device that is not there is refused."""
    import torch

    from hooked_vit.errors import UserError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return device


def check_out_dir(out: str) -> None:
    from hooked_vit.errors import UserError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the results")


def load_inputs(args: argparse.Namespace, data: str | None = None, source=None):
    """The model and dataset of `--model/--arch/--random-weights`, `--data` (or `data`) and
    `--labels`, each spec parsed once; returns (model, dataset, model spec). A `--target` is
    checked against the model before any image is read. source: the spec's hf / open_clip
    model when already loaded (`load_text_inputs`)."""
    from circuits.runs.sources import load_dataset, load_model
    from circuits.runs.specs import parse_data_spec, parse_model_spec

    if getattr(args, "out", None):
        check_out_dir(args.out)
    spec = parse_model_spec(args.model, args.arch, args.random_weights)
    data_spec = parse_data_spec(args.data if data is None else data)
    if data_spec.is_video:
        require_video_command(args, f"--data {data_spec.text} holds video clips:")
    if getattr(args, "mask_sampling", None) is not None:
        from circuits.data.transforms import MaskSampling

        args.mask_sampling = MaskSampling.parse(args.mask_sampling)  # refused before the model loads
    from circuits.runs.precision import parse_dtype

    device = resolve_device(args.device)
    texts, directions = class_texts(args), None
    if texts:  # the CLIP model is loaded once: text directions first, the image tower from it
        from circuits.runs.texts import text_directions

        source, directions = text_directions(spec, texts, device)
    model = load_model(spec, device=device, dtype=parse_dtype(args.dtype), source=source)
    if model.cfg.is_video:
        require_video_command(args, f"{model.cfg.model_name} is a video model:")
    if getattr(args, "class_space", False):
        if texts:
            from hooked_vit.text_classes import install_text_classes

            install_text_classes(model, directions, class_names=texts)
        model.require_classes()  # a CLIP tower without texts, a headless model: refused before any image
    if getattr(args, "target", None) is not None:
        from circuits.data.targets import TargetSpec

        args.target = TargetSpec.of(args.target, model)
    dataset = load_dataset(data_spec, model, spec, labels=getattr(args, "labels", None),
                           num_frames=getattr(args, "num_frames", None))
    return model, dataset, spec


def require_video_command(args: argparse.Namespace, what: str) -> None:
    """Refuse video models and clips in a command that does not run on them (not in VIDEO_COMMANDS)."""
    from hooked_vit.errors import UserError

    if not getattr(args, "video", False):
        command = " ".join(c for c in (getattr(args, "command", None), getattr(args, "sae_command", None)) if c)
        raise UserError(f"{what} `hooked-vit {command}` does not run on video yet; video runs: "
                         f"{', '.join(VIDEO_COMMANDS)} (docs/video.md)")


def class_texts(args: argparse.Namespace) -> list[str] | None:
    """The --texts / --text-file prompts of a class-space command, or None."""
    if not getattr(args, "class_space", False) or not (getattr(args, "texts", None) or getattr(args, "text_file", None)):
        return None
    from circuits.runs.texts import read_texts

    texts = read_texts(args.texts, args.text_file)
    if not texts:
        raise ValueError("--texts / --text-file hold no prompts; give at least one class prompt")
    return texts


def load_text_inputs(args: argparse.Namespace, texts: list[str]):
    """`load_inputs` for runs with text prompts: the CLIP model is loaded once, first (a model
    without a text tower is refused before anything else loads), for its text directions and
    its image tower; returns (model, dataset, model spec, text directions [len(texts),
    d_image_embed])."""
    from circuits.runs.specs import parse_model_spec
    from circuits.runs.texts import text_directions

    if getattr(args, "out", None):
        check_out_dir(args.out)
    spec = parse_model_spec(args.model, args.arch, args.random_weights)
    clip, directions = text_directions(spec, texts, resolve_device(args.device))
    model, dataset, spec = load_inputs(args, source=clip)
    return model, dataset, spec, directions
