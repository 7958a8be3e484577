"""Splicing a dictionary into a HookedViT at its hook, with hook points on its features.

The HookPoint at ``cfg.hook_name`` (for a transcoder: at ``cfg.hook_out``) is swapped for a
`SplicedDictionary`, itself a HookPoint (so hooks on the original name still work; they see
what flows on), holding the dictionary and five HookPoints:

    <hook>.hook_sae_input  [b, p, d_in]   what the dictionary reads
    <hook>.hook_sae_acts   [b, p, d_sae]  feature activations
    <hook>.hook_sae_recons [b, p, d_out]  reconstruction (prediction, for a transcoder)
    <hook>.hook_sae_error  [b, p, d_out]  true activation - reconstruction
    <hook>.hook_sae_output [b, p, d_out]  what flows on: recons (+ error when use_error)

then ``model.setup()`` so run_with_cache / run_with_hooks / patching see them, as SAELens's
HookedSAETransformer does for language models. With ``use_error=True`` the model computes
exactly its original function (up to float rounding) while the features are exposed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from circuits.sae.dictionaries import SparseDictionary
from hooked_vit.errors import UserError


class _Tap(HookPoint):
    """Stands in for a transcoder's input hook: passes through and keeps the last value."""

    def __init__(self, original: HookPoint):
        super().__init__()
        self.original = original
        self.value: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        self.value = x
        return x


class SplicedDictionary(HookPoint):
    def __init__(self, sae: SparseDictionary, original: HookPoint, use_error: bool = True,
                 tap: Optional[_Tap] = None):
        super().__init__()
        self.sae, self.original, self.use_error, self.tap = sae, original, use_error, tap
        for name in ("input", "acts", "recons", "error", "output"):
            setattr(self, f"hook_sae_{name}", HookPoint())

    def forward(self, x: Tensor) -> Tensor:
        source = x if self.tap is None else self.tap.value
        if source is None:
            raise UserError(f"the transcoder's input hook {self.sae.cfg.hook_name} did not run before its output")
        source = self.hook_sae_input(source)
        acts = self.hook_sae_acts(self.sae.encode(source))
        recons = self.hook_sae_recons(self.sae.decode(acts).to(x.dtype))
        if not self.use_error:
            return self.hook_sae_output(recons)
        error = self.hook_sae_error(x - recons.detach())
        return self.hook_sae_output(recons + error)


def _get(model, name: str):
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def attach_dictionary(model, sae: SparseDictionary, use_error: bool = True) -> SplicedDictionary:
    """Splice `sae` in at its hook (in place); returns the spliced module."""
    cfg = sae.cfg
    where = cfg.hook_out if cfg.is_transcoder else cfg.hook_name
    for hook in filter(None, (cfg.hook_name, cfg.hook_out)):
        if hook not in model.hook_dict:
            raise UserError(f"{hook} is not a hook point of {model.cfg.model_name}; see model.hook_dict")
    original = model.hook_dict[where]
    if isinstance(original, SplicedDictionary) or isinstance(model.hook_dict[cfg.hook_name], _Tap):
        raise UserError(f"a dictionary is already spliced at {where}; detach it first")
    tap = None
    if cfg.is_transcoder:
        parent, child = _get(model, cfg.hook_name)
        tap = _Tap(model.hook_dict[cfg.hook_name])
        setattr(parent, child, tap)
    parent, child = _get(model, where)
    spliced = SplicedDictionary(sae.to(next(model.parameters()).device).eval(), original, use_error, tap)
    setattr(parent, child, spliced)
    model.setup()
    return spliced


def detach_dictionary(model, hook_name: str) -> SparseDictionary:
    """Undo `attach_dictionary` at `hook_name` (the output hook, for a transcoder)."""
    spliced = model.hook_dict.get(hook_name)
    if not isinstance(spliced, SplicedDictionary):
        raise UserError(f"no dictionary is spliced at {hook_name}")
    spliced.remove_hooks(including_permanent=True)
    parent, child = _get(model, hook_name)
    setattr(parent, child, spliced.original)
    if spliced.tap is not None:
        parent, child = _get(model, spliced.sae.cfg.hook_name)
        setattr(parent, child, spliced.tap.original)
    model.setup()
    return spliced.sae


@contextmanager
def spliced(model, sae: SparseDictionary, use_error: bool = True) -> Iterator[SplicedDictionary]:
    """``with spliced(model, sae): model.run_with_cache(...)``; always detached afterwards."""
    module = attach_dictionary(model, sae, use_error)
    where = sae.cfg.hook_out if sae.cfg.is_transcoder else sae.cfg.hook_name
    try:
        yield module
    finally:
        detach_dictionary(model, where)
