"""Where TransformerLens's conventions meet images: what `HookedViT` needs so that code
written for `HookedTransformer` / `transformer_lens.patching` runs unchanged.

- Hook-name aliases, resolved in one place (`canonical_hook_name`).
- `ImageTokens`: images that look like a `[batch, n_tokens]` token batch to
  `transformer_lens.patching`, which reads the position count from the input's last
  dimension (docs/differences_from_transformer_lens.md#activation-patching).
- The refusal of a TL position sweep over raw images (it would sweep the image width).
- Class names as "tokens" (`class_id`) and composition scores between heads.
"""

from __future__ import annotations

import difflib
import re
import sys
from types import FrameType
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import composition_scores

from hooked_vit.errors import UserError

# TransformerLens 4.3's `patching.get_act_patch_direct_path` (written for TransformerBridge)
# names the per-head attention inputs `blocks.{l}.attn.hook_{q,k,v}_input`;
# `get_act_name` and HookedTransformer put them on the block. The block names are the
# hook points; the attention-level spellings are aliases of them.
_ALIAS = re.compile(r"^(blocks\.\d+)\.attn\.(hook_(?:q_input|k_input|v_input|attn_in))(_grad)?$")


def canonical_hook_name(name: str) -> str:
    """The hook point a name refers to: `blocks.L.attn.hook_q_input` (an alias, also for
    `k_input`, `v_input`, `attn_in` and their `_grad` cache keys) -> `blocks.L.hook_q_input`;
    every other name unchanged."""
    match = _ALIAS.match(name)
    return name if match is None else f"{match[1]}.{match[2]}{match[3] or ''}"


class ImageTokens:
    """An image batch that `transformer_lens.patching` treats as a token batch.

    TL's sweeps read the number of positions from `corrupted_tokens.shape[-1]` and the
    batch size from `shape[0]`, and hand the input back to `model.run_with_hooks`.
    `shape` is therefore `(batch, n_tokens)` (the model's sequence length for these
    images), and `HookedViT.forward` runs `images`. Made by `HookedViT.to_tokens`.
    """

    def __init__(self, images: Float[Tensor, "b c h w"], n_tokens: int):
        if images.ndim != 4:
            raise UserError(f"ImageTokens holds an image batch [b, c, h, w], got shape {tuple(images.shape)}")
        self.images = images
        self.n_tokens = int(n_tokens)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.images.shape[0], self.n_tokens))

    def size(self, dim: Optional[int] = None) -> Union[torch.Size, int]:
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, *args: Any, **kwargs: Any) -> "ImageTokens":
        return ImageTokens(self.images.to(*args, **kwargs), self.n_tokens)

    def __repr__(self) -> str:
        return f"ImageTokens(batch={len(self)}, n_tokens={self.n_tokens}, images={tuple(self.images.shape)})"


_POSITION_AXES = {"pos", "src_pos", "dest_pos"}


def refuse_image_position_sweep(caller: Optional[FrameType], model_args: Sequence[Any]) -> None:
    """Raise if `transformer_lens.patching.generic_activation_patch` (the caller) sweeps
    positions it took from a raw image tensor's last dimension (the image width).

    Sweeps with an explicit `index_df` (as `circuits.patching` runs them) or over layers
    and heads only are left alone."""
    if caller is None or not model_args or not isinstance(model_args[0], Tensor) or model_args[0].ndim != 4:
        return
    tl_patching = sys.modules.get("transformer_lens.patching")  # not imported: not the caller
    sweep = getattr(tl_patching, "generic_activation_patch", None)
    if caller.f_code is not getattr(sweep, "__code__", None):
        return
    axes = caller.f_locals.get("index_axis_names")
    if axes is not None and _POSITION_AXES & set(axes):
        raise UserError(
            "transformer_lens.patching takes the position count from the input's last dimension, here the "
            f"image width ({model_args[0].shape[-1]}): pass model.to_tokens(images) as corrupted_tokens, or "
            "use circuits.patching.patch_activations"
        )


def class_id(name_or_id: Union[str, int], class_names: Optional[Sequence[str]],
             label_names: Optional[Sequence[str]], n_classes: int) -> int:
    """A class index from a class name (`cfg.class_names`, or a `cfg.label_names` id such as
    a WordNet id) or an index; TransformerLens's `to_single_token` for classes."""
    if isinstance(name_or_id, bool) or not isinstance(name_or_id, (str, int)):
        raise UserError(f"a class is a name or an index, got {name_or_id!r}")
    if isinstance(name_or_id, int):
        if not -n_classes <= name_or_id < n_classes:
            raise UserError(f"class index {name_or_id} is out of range for {n_classes} classes")
        return name_or_id % n_classes
    for names in (class_names, label_names):
        if names is not None and name_or_id in names:
            return list(names).index(name_or_id)
    if class_names is None and label_names is None:
        raise UserError(f"class {name_or_id!r}: this model has no class names (cfg.class_names); pass class indices")
    known = list(dict.fromkeys([*(class_names or ()), *(label_names or ())]))
    close = difflib.get_close_matches(name_or_id, known, n=3)
    raise UserError(f"unknown class {name_or_id!r}" + (f"; did you mean {close}?" if close else "; see model.cfg.class_names"))


def all_composition_scores(
    W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, mode: str
) -> Float[Tensor, "l1 h1 l2 h2"]:
    """Q-, K- or V-composition of every earlier head (l1, h1) into every later head (l2, h2)
    (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"):
    ||OV_1 M_2||_F / (||OV_1||_F ||M_2||_F) with M_2 = W_Q W_K^T (Q), its transpose (K) or
    W_V W_O (V), all [d_model, d_model]. Entries with l2 <= l1 are 0, as in TransformerLens.
    Weights are stacked [n_layers, n_heads, ...]."""
    ov = FactoredMatrix(W_V, W_O)
    if mode == "Q":
        reader = FactoredMatrix(W_Q, W_K.transpose(-2, -1))
    elif mode == "K":
        reader = FactoredMatrix(W_Q, W_K.transpose(-2, -1)).T
    elif mode == "V":
        reader = ov
    else:
        raise UserError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
    scores = composition_scores(ov, reader, broadcast_dims=True)  # [l1, h1, l2, h2]
    layer = torch.arange(W_Q.shape[0], device=scores.device)
    later = layer[:, None, None, None] < layer[None, None, :, None]
    return torch.where(later, scores, torch.zeros_like(scores))
