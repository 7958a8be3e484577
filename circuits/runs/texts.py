"""Text prompts for the text-aware runs, and the CLIP text tower of the run's model spec.

    texts = read_texts("a dog,a red car", None)                 # --texts / --text-file
    clip, directions = text_directions(parse_model_spec("hf:clip_folder"), texts)

The text tower is the one the image tower came from: an open_clip model with trained
weights ("open_clip:ARCH:TAG", `open_clip.get_tokenizer(ARCH)`, which ships its
vocabulary), or a transformers `CLIPModel` folder / cached hub id saved with its tokenizer
("hf:..."). Directions are `circuits.decomposition.align.clip_text_directions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from circuits.runs.specs import ModelSpec


def read_texts(texts: Optional[str], text_file: Optional[str]) -> list[str]:
    """Prompts from a comma-separated string and/or a file of one prompt per line (blank lines
    and lines starting with '#' skipped), in that order; refuses duplicates."""
    out = [t.strip() for t in (texts or "").split(",") if t.strip()]
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"--text-file {text_file} does not exist")
        lines = (line.strip() for line in path.read_text().splitlines())
        out += [line for line in lines if line and not line.startswith("#")]
    repeated = sorted({t for t in out if out.count(t) > 1})
    if repeated:
        raise ValueError(f"prompts must be distinct; repeated: {repeated}")
    return out


def text_encoder(spec: ModelSpec, device: str = "cpu") -> tuple[Any, Any]:
    """(CLIP model with its text tower, tokenizer) of a model spec; refuses specs without one."""
    if spec.kind == "open_clip":
        return _open_clip_encoder(spec, device)
    if spec.kind == "hf":
        return _hf_encoder(spec, device)
    raise ValueError(f"--model {spec.text}: text prompts need a CLIP model with its text tower "
                     "(open_clip:ARCH:TAG or hf:FOLDER_OR_ID of a CLIPModel)")


def _open_clip_encoder(spec: ModelSpec, device: str) -> tuple[Any, Any]:
    import open_clip

    arch, _, tag = spec.name.partition(":")
    if not tag:
        raise ValueError(f"--model {spec.text}: without a weights tag the image and text towers would be two "
                         "unrelated random initialisations; name the weights, open_clip:ARCH:TAG")
    try:
        model = open_clip.create_model(arch, pretrained=tag, device=device)
    except Exception as err:
        raise FileNotFoundError(f"open_clip could not load weights {tag!r} for {arch} "
                                f"({str(err).splitlines()[0]}); they must be in open_clip's cache") from None
    return model.eval(), lambda texts: open_clip.get_tokenizer(arch)(texts)


def _hf_encoder(spec: ModelSpec, device: str) -> tuple[Any, Any]:
    import transformers

    from hooked_vit.specs import require_cached_hub_id

    local = Path(spec.name).expanduser().is_dir()
    if not local:  # a hub id: from the local cache only, refused at once otherwise
        require_cached_hub_id(spec.name)
    config = transformers.AutoConfig.from_pretrained(spec.name, local_files_only=True)
    if "CLIPModel" not in (config.architectures or []):
        raise ValueError(f"--model {spec.text} is a {config.architectures}, not a CLIPModel: it has no text tower")
    model = transformers.CLIPModel.from_pretrained(spec.name, local_files_only=True).to(device).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--model {spec.text}: no tokenizer saved with the model "
                                f"({str(err).splitlines()[0]}); save it there with tokenizer.save_pretrained") from None
    return model, lambda texts: tokenizer(texts, padding=True, return_tensors="pt")


def text_directions(spec: ModelSpec, texts: list[str], device: str = "cpu") -> tuple[Any, torch.Tensor]:
    """The spec's CLIP model (its image tower can be built from it, `load_model(spec,
    source=clip)`, so it is loaded once) and the unit text embeddings [len(texts),
    d_image_embed] of its own text tower."""
    from circuits.decomposition.align import clip_text_directions

    model, tokenizer = text_encoder(spec, device)
    return model, clip_text_directions(model, tokenizer, texts).cpu()
