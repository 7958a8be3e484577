"""The ViT computational graph of edge-level circuit discovery (Syed et al. 2023, "Attribution
Patching Outperforms Automated Circuit Discovery"; Hanna et al. 2024, "Have Faith in
Faithfulness").

Writers (nodes that add to the residual stream): "embed" (blocks.0.hook_resid_pre), every
head "L{l}H{h}" (its output z @ W_O, LayerScale included), every MLP "MLP{l}" (hook_mlp_out).
Readers (nodes that read it): every head's query, key and value input "L{l}H{h}.q/.k/.v"
(blocks.{l}.hook_{q,k,v}_input, [b, p, h, d], the split-input flag), every MLP "MLP{l}"
(hook_mlp_in) and "logits" (the last resid_post, read only by the final norm). An edge joins a
writer to every reader after it. Because the residual stream is the sum of the writers (plus
constant biases), a reader's input with the edges from a set of writers patched is its input
plus the sum over those writers of (source value - current value): `run_patched` does that.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vit import HookedViT
from hooked_vit.errors import UserError

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class ViTGraph:
    n_layers: int
    n_heads: int

    @classmethod
    def of(cls, model: HookedViT) -> "ViTGraph":
        if model.cfg.block_type != "pre_norm":
            raise UserError("edge-level circuit discovery needs pre-norm blocks (post-norm norms sit on the residual stream)")
        if model.cfg.attn_only:
            raise UserError("attn_only models are not supported by the circuit graph")
        if model.cfg.attention_type == "divided_space_time":
            raise UserError("the circuit graph (path patching, edge attribution) has no node for divided space-time "
                             "attention's temporal heads and its per-head inputs are off there; use a joint-attention "
                             "video model")
        return cls(model.cfg.n_layers, model.cfg.n_heads)

    # ---- nodes, in the order they run
    @property
    def writers(self) -> list[str]:
        names = ["embed"]
        for l in range(self.n_layers):
            names += [f"L{l}H{h}" for h in range(self.n_heads)] + [f"MLP{l}"]
        return names

    @property
    def readers(self) -> list[str]:
        names = []
        for l in range(self.n_layers):
            names += [f"L{l}H{h}.{s}" for s in QKV for h in range(self.n_heads)] + [f"MLP{l}"]
        return names + ["logits"]

    def attn_readers(self, layer: int, s: str) -> slice:
        """Reader indices of layer `layer`'s `s` inputs, in head order."""
        start = layer * (3 * self.n_heads + 1) + QKV.index(s) * self.n_heads
        return slice(start, start + self.n_heads)

    def mlp_reader(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    def n_writers_before(self, layer: int, mlp: bool) -> int:
        """Writers that run before layer `layer`'s attention (or its MLP)."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if mlp else 0)

    def edge_mask(self) -> Tensor:
        """[writers, readers] bool: True where the edge exists (writer runs before reader)."""
        mask = torch.zeros(len(self.writers), len(self.readers), dtype=torch.bool)
        for l in range(self.n_layers):
            for s in QKV:
                mask[: self.n_writers_before(l, False), self.attn_readers(l, s)] = True
            mask[: self.n_writers_before(l, True), self.mlp_reader(l)] = True
        mask[:, -1] = True
        return mask

    def reader_owner(self) -> Tensor:
        """[readers] long: the writer index of the node each reader belongs to (a head's
        q/k/v inputs belong to the head, an MLP's input to the MLP), -1 for the logits."""
        writers = {w: i for i, w in enumerate(self.writers)}
        return torch.tensor([writers.get(r.split(".")[0], -1) for r in self.readers])

    def writer_index(self, name: str) -> int:
        try:
            return self.writers.index(name)
        except ValueError:
            raise UserError(f"unknown writer {name!r}; writers are 'embed', 'L{{l}}H{{h}}', 'MLP{{l}}'") from None

    def reader_index(self, name: str) -> int:
        try:
            return self.readers.index(name)
        except ValueError:
            raise UserError(f"unknown reader {name!r}; readers are 'L{{l}}H{{h}}.q/.k/.v', 'MLP{{l}}', 'logits'") from None


@contextmanager
def graph_hooks_on(model: HookedViT):
    """Turn on the per-head q/k/v input and MLP input hooks for the duration."""
    if model.cfg.use_attn_in:
        raise UserError("circuit discovery needs use_split_qkv_input; turn use_attn_in off first")
    old = model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(old[0])
        model.set_use_hook_mlp_in(old[1])


def head_out(model: HookedViT, layer: int, z: Float[Tensor, "b p h e"]) -> Float[Tensor, "b p h d"]:
    return torch.einsum("bphe,hed->bphd", z, model.blocks[layer].attn.W_O)


def writer_values(model: HookedViT, cache) -> Float[Tensor, "w b p d"]:
    """Every writer's contribution to the residual stream, from a cache of the writer hooks."""
    out = [cache["blocks.0.hook_resid_pre"]]
    for l in range(model.cfg.n_layers):
        out += list(head_out(model, l, cache[f"blocks.{l}.attn.hook_z"]).unbind(2))
        out.append(cache[f"blocks.{l}.hook_mlp_out"])
    return torch.stack(out)


def writer_hook_names(n_layers: int) -> list[str]:
    names = ["blocks.0.hook_resid_pre"]
    for l in range(n_layers):
        names += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out"]
    return names


def reader_hook_names(n_layers: int) -> list[str]:
    names = []
    for l in range(n_layers):
        names += [f"blocks.{l}.hook_{s}_input" for s in QKV] + [f"blocks.{l}.hook_mlp_in"]
    return names + [f"blocks.{n_layers - 1}.hook_resid_post"]


def run_patched(model: HookedViT, images: Tensor, source: Float[Tensor, "w b p d"],
                patched: Float[Tensor, "w r"], fwd_hooks: Sequence = ()) -> Tensor:
    """Logits of a run on `images` in which every edge (writer, reader) carries the writer's
    `source` value instead of its current one, by weight `patched` (1 = patched, 0 = not).
    Evaluation only: call it without gradients (the differences are written into one buffer)."""
    graph = ViTGraph.of(model)
    patched = patched.to(source)
    # source - current value, per writer, filled in as the writers run (one buffer, not a
    # re-stacked copy of every earlier writer at each reader)
    diff = torch.empty_like(source)
    n_written = [0]

    def record(x: Tensor) -> None:
        i = n_written[0]
        torch.sub(source[i], x, out=diff[i])
        n_written[0] = i + 1

    def record_embed(x, hook):
        record(x)

    def record_z(z, hook):
        for out in head_out(model, hook.layer(), z).unbind(2):
            record(out)

    def record_mlp(x, hook):
        record(x)

    def correction(cols) -> Tensor:
        n = n_written[0]
        return torch.einsum("wbpd,w...->bp...d", diff[:n], patched[:n, cols])

    def attn_in(s):
        def hook(x, hook):
            return x + correction(graph.attn_readers(hook.layer(), s))
        return hook

    def mlp_in(x, hook):
        return x + correction(graph.mlp_reader(hook.layer()))

    def logits_in(x, hook):
        return x + correction(len(graph.readers) - 1)

    hooks = [("blocks.0.hook_resid_pre", record_embed)]
    for l in range(graph.n_layers):
        hooks += [(f"blocks.{l}.hook_{s}_input", attn_in(s)) for s in QKV]
        hooks += [(f"blocks.{l}.attn.hook_z", record_z), (f"blocks.{l}.hook_mlp_in", mlp_in),
                  (f"blocks.{l}.hook_mlp_out", record_mlp)]
    hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", logits_in))
    with graph_hooks_on(model), model.hooks(fwd_hooks=[*fwd_hooks, *hooks]):
        return model(images)


def cache_writers(model: HookedViT, images: Tensor, fwd_hooks: Sequence = ()) -> tuple[Tensor, Tensor]:
    """(logits, writer values [w, b, p, d]) of a run without gradients."""
    names = set(writer_hook_names(model.cfg.n_layers))
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        logits, cache = model.run_with_cache(images, names_filter=lambda n: n in names)
        return logits, writer_values(model, cache)


def targets(clean_logits: Tensor, corrupted_logits: Tensor, clean_t: Optional[Tensor], corrupted_t: Optional[Tensor]):
    """Class targets: given, else each run's prediction (as in `circuits.patching`)."""
    ct = clean_logits.argmax(-1) if clean_t is None else clean_t.to(clean_logits.device)
    rt = corrupted_logits.argmax(-1) if corrupted_t is None else corrupted_t.to(clean_logits.device)
    return ct, rt


def check_pair(clean: Tensor, corrupted: Tensor) -> None:
    if clean.shape != corrupted.shape:
        raise UserError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} images differ in shape")


def differentiable(fwd_hooks: Sequence) -> list:
    """The user's hooks, each preceded by a copy of its activation: a hook that edits in place
    (e.g. the planted head's `z[:, :, h] = ...`) would otherwise overwrite a tensor autograd
    saved (SDPA's output) and break the backward pass."""
    out = []
    for name, fn in fwd_hooks:
        out += [(name, lambda x, hook: x.clone()), (name, fn)]
    return out
