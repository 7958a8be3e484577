"""CLIP's text tower as a class embedding space (zero-shot classification).

Class embeddings follow Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision" (https://arxiv.org/abs/2103.00020, sec. 3.1.4) and OpenAI's
zero-shot ImageNet notebook: every prompt template filled with the class name goes
through the text tower, each text embedding is L2-normalised, the templates are averaged
and the mean is normalised again.

`install_text_classes` makes these the HookedViT's head on the image embedding
(`hook_image_embed`); `W_U = proj^T E^T` is then the unembedding, so `circuits.projection`,
`circuits.runs.identify` and every other analysis reading `W_U`/`b_U` use the
text-defined classes unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vit.model import HookedViT
from hooked_vit.errors import UserError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
Tokenizer = Callable[[list[str]], Union[Tensor, dict[str, Tensor]]]


def encode_texts(clip_model: nn.Module, texts: Sequence[str], tokenizer: Optional[Tokenizer] = None) -> Float[Tensor, "n d"]:
    """Text embeddings (after the text projection, not normalised) of an open_clip CLIP
    (`encode_text`) or a transformers `CLIPModel` (`get_text_features`).

    `tokenizer` maps a list of strings to token ids [n, ctx] or to a dict with `input_ids`
    (and `attention_mask`), e.g. a `CLIPTokenizer(..., padding=True, return_tensors="pt")`.
    For open_clip it defaults to `open_clip.tokenize` (the CLIP BPE tokenizer, whose
    vocabulary ships with the package, so it works offline) at the model's context length;
    towers with a Hugging Face text encoder (e.g. xlm-roberta) need their own `tokenizer=`
    (`open_clip.get_tokenizer(arch)`), and are refused without one.
    """
    if not texts:
        raise UserError("encode_texts needs at least one text")
    device = next(clip_model.parameters()).device
    if hasattr(clip_model, "encode_text"):  # open_clip
        if tokenizer is None:
            import open_clip

            if type(getattr(clip_model, "text", None)).__name__ == "HFTextEncoder":
                raise UserError("this open_clip model's text tower is a Hugging Face encoder, which the CLIP BPE "
                                 "tokenizer does not fit: pass tokenizer=open_clip.get_tokenizer(ARCH)")
            vocab = getattr(clip_model, "vocab_size", None) or getattr(getattr(clip_model, "text", None), "vocab_size", None)
            if vocab is not None and vocab != 49408:  # SigLIP's and other towers' own vocabularies
                raise UserError(f"this open_clip model's text tower has a vocabulary of {vocab} tokens, not the CLIP "
                                 "BPE tokenizer's 49408: pass tokenizer=open_clip.get_tokenizer(ARCH)")
            tokenizer = open_clip.tokenize
            context = getattr(clip_model, "context_length", 77)
            tokens = tokenizer(list(texts), context_length=context)
        else:
            tokens = tokenizer(list(texts))
        return clip_model.encode_text(_ids(tokens).to(device))
    if hasattr(clip_model, "get_text_features"):  # transformers CLIPModel
        if tokenizer is None:
            raise UserError(
                "a transformers CLIPModel needs tokenizer=: e.g. lambda t: CLIPTokenizer.from_pretrained(folder)"
                "(t, padding=True, return_tensors='pt'), or any callable returning token ids"
            )
        tokens = tokenizer(list(texts))
        inputs = dict(tokens) if isinstance(tokens, dict) or hasattr(tokens, "keys") else {"input_ids": tokens}
        out = clip_model.get_text_features(**{k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")})
        return out if torch.is_tensor(out) else out.pooler_output
    raise TypeError(
        f"{type(clip_model).__name__} has no text tower: pass an open_clip CLIP or a transformers CLIPModel"
    )


def _ids(tokens: Any) -> Tensor:
    return tokens["input_ids"] if isinstance(tokens, dict) or hasattr(tokens, "keys") else tokens


@torch.no_grad()
def text_class_embeddings(
    clip_model: nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    tokenizer: Optional[Tokenizer] = None,
) -> Float[Tensor, "n_classes d_embed"]:
    """Zero-shot CLIP class embeddings: templates averaged, unit norm (see module docstring)."""
    if not class_names:
        raise UserError("text_class_embeddings needs at least one class name")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"every template must contain '{{}}' where the class name goes; got {bad or templates}")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = F.normalize(encode_texts(clip_model, texts, tokenizer).float(), dim=-1)
    emb = emb.view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def install_text_classes(
    model: HookedViT,
    class_embeddings: Float[Tensor, "n_classes d_embed"],
    scale: float = 1.0,
    class_names: Optional[Sequence[str]] = None,
) -> HookedViT:
    """Put a head of text class embeddings on the model's image embedding, in place.

    The model must have CLIP's image projection (`from_open_clip`, `from_hf` of
    `CLIPVisionModelWithProjection` / `CLIPModel`): the head `scale * E` (no bias) reads
    `hook_image_embed`, so logits are `scale * <E, image embedding>`, the projection stays
    a visible, patchable step, and `W_U = proj^T (scale * E)^T` is the folded unembedding.
    A headless model without a projection whose `d_model` equals the text width gets the
    head on its pooled vector. Installing again replaces the classes. With
    `scale = clip.logit_scale.exp()` and a normalised image embedding these would be CLIP's
    zero-shot logits (the per-image normalisation is left out: it is not linear, and it
    does not change the ranking of the classes). `class_names` (one per row of E) become
    `cfg.class_names`.
    """
    if class_embeddings.ndim != 2:
        raise UserError(f"class_embeddings must be [n_classes, d_embed], got {tuple(class_embeddings.shape)}")
    n, d_embed = class_embeddings.shape
    if class_names is not None and len(class_names) != n:
        raise UserError(f"class_names has {len(class_names)} entries for {n} class embeddings")
    param = _check_text_width(model, d_embed)
    head = nn.Linear(d_embed, n, bias=False).to(param)
    head.weight.copy_(scale * class_embeddings.to(param))
    cfg = model.cfg
    model.head, model.head_dist = head, None
    cfg.n_classes, cfg.head_bias, cfg.head_on_image_embed = n, False, model.image_proj is not None
    cfg.label_names = None
    cfg.class_names = None if class_names is None else tuple(str(c) for c in class_names)
    return model


def _check_text_width(model: HookedViT, d_embed: int) -> Tensor:
    """Refuse a model whose image embedding cannot be compared with `d_embed`-wide texts;
    returns a parameter giving the device and dtype of the new head."""
    if model.cfg.distilled or model.cfg.global_pool == "token_avg":
        raise UserError("text classes need a single-vector CLIP tower, not a distilled or token_avg model")
    if model.image_proj is not None:
        if model.image_proj.out_features != d_embed:
            raise UserError(
                f"the model's image projection has {model.image_proj.out_features} outputs, not the text width "
                f"{d_embed}; use text embeddings of the same CLIP model as the image tower"
            )
        return model.image_proj.weight
    if model.head is not None or d_embed != model.cfg.d_model:
        raise UserError(
            f"the model has no image projection and d_model={model.cfg.d_model}, head={model.head is not None}: "
            f"text width {d_embed} cannot be compared with it; load the tower with its projection "
            "(CLIPVisionModelWithProjection, CLIPModel or open_clip)"
        )
    return model.embed.proj.weight
