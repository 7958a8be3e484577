"""Sparse dictionaries spliced into a HookedViT: SAELens's HookedSAETransformer habits.

`SAEHost` gives HookedViT ``add_sae``, ``reset_saes``, ``saes`` (a context manager),
``run_with_saes``, ``run_with_cache_with_saes`` and ``run_with_hooks_with_saes``, duck-typed
over any module with ``encode`` / ``decode`` and SAELens's hook points (``hook_sae_input``,
``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``): hooked-vit's
``circuits.sae.SparseDictionary`` and SAELens's own ``SAE`` classes alike. Its hook names come
from ``cfg.hook_name`` / ``cfg.hook_out`` (hooked-vit) or ``cfg.metadata.hook_name`` /
``cfg.metadata.hook_name_out`` (SAELens 6); input != output hook makes it a transcoder.

The HookPoint at the output hook is replaced by a `SpliceHook`, itself a HookPoint (hooks on
the original name still fire, on what flows on), whose children are the dictionary's hook
points plus its own ``hook_sae_error`` and ``hook_sae_output``, so the cache names are
SAELens's, e.g. ``blocks.4.hook_resid_post.hook_sae_acts_post``. With the error term, as
SAELens: error = true activation - reconstruction of the *unedited* input, computed without
hooks and without gradient, added to the (possibly edited) reconstruction. Edits at
hook_sae_acts_post / hook_sae_recons therefore reach the output, and gradients past the
splice flow through the dictionary only (docs/sparse_autoencoders.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.errors import UserError

_BLANK = nn.Identity()


def sae_hook_names(sae: nn.Module) -> tuple[str, str]:
    """(input hook, output hook) of a dictionary, hooked-vit's or SAELens's."""
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None)
    hook_in = getattr(cfg, "hook_name", None) or getattr(meta, "hook_name", None) or getattr(sae, "hook_name", None)
    if not hook_in:
        raise UserError(f"{type(sae).__name__} names no hook: it needs cfg.hook_name (or cfg.metadata.hook_name)")
    hook_out = getattr(cfg, "hook_out", None) or getattr(meta, "hook_name_out", None) or hook_in
    return hook_in, hook_out


@contextmanager
def hooks_disabled(sae: nn.Module) -> Iterator[None]:
    """Swap every HookPoint of `sae` (its ``hook_dict``) for an identity, as SAELens's
    ``_disable_hooks`` does while computing the clean error term."""
    hooks = dict(getattr(sae, "hook_dict", {}))
    try:
        for name in hooks:
            setattr(sae, name, _BLANK)
        yield
    finally:
        for name, hook in hooks.items():
            setattr(sae, name, hook)


class SpliceHook(HookPoint):
    """Stands at a dictionary's output hook; computes what flows on there."""

    def __init__(self, sae: nn.Module, original: HookPoint, hook_in: str, hook_out: str, use_error_term: bool):
        super().__init__()
        # Not registered as submodules: cache names carry no ".sae." and the original hook point
        # is not listed twice (SAELens's _SAEWrapper keeps its SAE the same way).
        self.__dict__.update(sae=sae, original=original, hook_in=hook_in, hook_out=hook_out)
        for name, hook in getattr(sae, "hook_dict", {}).items():
            if name not in ("hook_sae_error", "hook_sae_output"):
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()  # [..., d_out]
        self.hook_sae_output = HookPoint()  # [..., d_out]
        self.use_error_term = bool(use_error_term)
        self.captured: Optional[Tensor] = None

    def capture(self, x: Tensor, hook: Any = None) -> Tensor:
        """Permanent hook at a transcoder's input hook: keeps what the dictionary reads."""
        self.captured = x
        return x

    def forward(self, x: Float[Tensor, "... d_out"]) -> Float[Tensor, "... d_out"]:
        source = x if self.hook_in == self.hook_out else self.captured
        if source is None:
            raise UserError(f"the transcoder's input hook {self.hook_in} did not run before {self.hook_out} "
                            "(were its permanent hooks removed?)")
        try:
            out = self._reconstruct(source)
            if self.use_error_term:
                with torch.no_grad():  # no gradient through the error: only the dictionary path
                    with hooks_disabled(self.sae):
                        clean = self._reconstruct(source)
                    error = self.hook_sae_error(x.to(clean.dtype) - clean)
                out = out + error
            return self.hook_sae_output(out).to(x.dtype)
        finally:
            self.captured = None

    def _reconstruct(self, source: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        out = self.sae.decode(self.sae.encode(source))
        w_skip = getattr(self.sae, "W_skip", None)  # skip transcoders (SAELens's SkipTranscoder layout)
        return out if w_skip is None else out + source.to(w_skip.dtype) @ w_skip.T


class SAEHost:
    """Mixin for HookedViT: SAELens's HookedSAETransformer methods (see the module docstring)."""

    @property
    def acts_to_saes(self) -> dict[str, nn.Module]:
        """Input hook name -> the dictionary spliced there."""
        return {name: splice.sae for name, splice in self._splices().items()}

    def _splices(self) -> dict[str, SpliceHook]:
        return {m.hook_in: m for m in self.modules() if isinstance(m, SpliceHook)}  # type: ignore[attr-defined]

    def add_sae(self, sae: nn.Module, use_error_term: Optional[bool] = None) -> SpliceHook:
        """Splice `sae` in (until `reset_saes`); one at the same input hook is replaced.

        use_error_term: None keeps ``sae.use_error_term`` (SAELens's default False)."""
        hook_in, hook_out = sae_hook_names(sae)
        if hook_in in self._splices():
            self.reset_saes(hook_in)
        for hook in {hook_in, hook_out}:
            if hook not in self.hook_dict:  # type: ignore[attr-defined]
                raise UserError(f"{hook} is not a hook point of {self.cfg.model_name}; see model.hook_dict")  # type: ignore[attr-defined]
        original = self.hook_dict[hook_out]  # type: ignore[attr-defined]
        if isinstance(original, SpliceHook):
            raise UserError(f"a dictionary reading {original.hook_in} already writes {hook_out}; reset it first")
        use = getattr(sae, "use_error_term", False) if use_error_term is None else use_error_term
        device = next(self.parameters()).device  # type: ignore[attr-defined]
        if any(p.device != device for p in sae.parameters()):
            sae.to(device)
        splice = SpliceHook(sae, original, hook_in, hook_out, use)
        if hook_in != hook_out:
            handle = self.hook_dict[hook_in].add_hook(splice.capture, dir="fwd", is_permanent=True)  # type: ignore[attr-defined]
            splice.__dict__["capture_handle"] = (self.hook_dict[hook_in], handle)  # type: ignore[attr-defined]
        _set(self, hook_out, splice)
        self.setup()  # type: ignore[attr-defined]
        return splice

    def reset_saes(self, act_names: Union[str, Sequence[str], None] = None) -> None:
        """Remove the dictionaries reading `act_names` (input hook names; all when None)."""
        splices = self._splices()
        names = list(splices) if act_names is None else [act_names] if isinstance(act_names, str) else list(act_names)
        for name in names:
            splice = splices.get(name) or next((s for s in splices.values() if s.hook_out == name), None)
            if splice is None:
                raise UserError(f"no dictionary is spliced at {name}; spliced: {sorted(splices) or 'none'}")
            splice.remove_hooks(including_permanent=True)
            if "capture_handle" in splice.__dict__:
                point, handle = splice.__dict__.pop("capture_handle")
                handle.hook.remove()
                point.fwd_hooks.remove(handle)
            _set(self, splice.hook_out, splice.original)
            self.setup()  # type: ignore[attr-defined]

    @contextmanager
    def saes(self, saes: Union[nn.Module, Sequence[nn.Module]] = (), reset_saes_end: bool = True,
             use_error_term: Optional[bool] = None) -> Iterator[Any]:
        """Splice `saes` for the block; on exit remove them and restore what they displaced."""
        saes = [saes] if isinstance(saes, nn.Module) else list(saes)
        before = {name: (s.sae, s.use_error_term) for name, s in self._splices().items()}
        added = []
        try:
            for sae in saes:
                added.append(sae_hook_names(sae)[0])
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                for name in added:
                    if name in self._splices():
                        self.reset_saes(name)
                    if name in before:
                        self.add_sae(before[name][0], use_error_term=before[name][1])

    def run_with_saes(self, *model_args: Any, saes: Union[nn.Module, Sequence[nn.Module]] = (),
                      reset_saes_end: bool = True, use_error_term: Optional[bool] = None, **model_kwargs: Any) -> Any:
        """One forward pass with `saes` spliced in."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self(*model_args, **model_kwargs)  # type: ignore[operator]

    def run_with_cache_with_saes(self, *model_args: Any, saes: Union[nn.Module, Sequence[nn.Module]] = (),
                                 reset_saes_end: bool = True, use_error_term: Optional[bool] = None,
                                 **kwargs: Any) -> Any:
        """`run_with_cache` with `saes` spliced in; their hooks are cached under SAELens's names."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_cache(*model_args, **kwargs)  # type: ignore[attr-defined]

    def run_with_hooks_with_saes(self, *model_args: Any, saes: Union[nn.Module, Sequence[nn.Module]] = (),
                                 reset_saes_end: bool = True, use_error_term: Optional[bool] = None,
                                 fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), **kwargs: Any) -> Any:
        """`run_with_hooks` with `saes` spliced in."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **kwargs)  # type: ignore[attr-defined]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
