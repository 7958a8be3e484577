"""Splicing a dictionary into a HookedViT: hooked-vit's short names for SAELens's habits.

``attach_dictionary`` / ``detach_dictionary`` / ``with spliced(model, sae, use_error=...)``
are `HookedViT.add_sae` / `reset_saes` / `saes` (hooked_vit/saes.py, one definition). At the
dictionary's hook (its output hook, for a transcoder) the model then has, as SAELens names them:

    <hook>.hook_sae_input      [b, p, d_in]   what the dictionary reads
    <hook>.hook_sae_acts_pre   [b, p, d_sae]  pre-activations
    <hook>.hook_sae_acts_post  [b, p, d_sae]  feature activations
    <hook>.hook_sae_recons     [b, p, d_out]  reconstruction (prediction, for a transcoder)
    <hook>.hook_sae_error      [b, p, d_out]  true activation - reconstruction of the unedited input
    <hook>.hook_sae_output     [b, p, d_out]  what flows on: recons (+ error with use_error)

With ``use_error=True`` the unedited model computes its original function (up to float
rounding), while edits of the features reach the output and gradients past the splice flow
through the dictionary only (SAELens's convention; docs/sparse_autoencoders.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from hooked_vit.saes import SpliceHook, sae_hook_names

from circuits.sae.dictionaries import SparseDictionary


def attach_dictionary(model, sae: SparseDictionary, use_error: bool = True) -> SpliceHook:
    """Splice `sae` in (in place, until `detach_dictionary`); returns the splice hook point."""
    return model.add_sae(sae.eval(), use_error_term=use_error)


def detach_dictionary(model, hook_name: str) -> SparseDictionary:
    """Undo `attach_dictionary` at `hook_name` (its input or output hook)."""
    splices = model._splices()
    splice = splices.get(hook_name) or next((s for s in splices.values() if s.hook_out == hook_name), None)
    if splice is None:
        raise ValueError(f"no dictionary is spliced at {hook_name}")
    model.reset_saes(splice.hook_in)
    return splice.sae


@contextmanager
def spliced(model, sae: SparseDictionary, use_error: bool = True) -> Iterator[SpliceHook]:
    """``with spliced(model, sae) as splice: model.run_with_cache(...)``; always detached afterwards."""
    with model.saes([sae.eval()], use_error_term=use_error):
        yield model.hook_dict[sae_hook_names(sae)[1]]
