"""The timm zoo as small random models: every registered name of the ViT modules HookedViT
covers, built with its own architecture options at depth 2, width 64, every parameter
randomised, and checked against HookedViT.

Used by tests/test_zoo.py (which asserts the share that loads and matches) and, with
`HOOKED_VIT_WRITE_ZOO=1`, to regenerate docs/supported_models.md.
`python tests/zoo.py` prints a summary.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import timm
import torch

from helpers import randomize_, rel_err

MODULES = ("vision_transformer", "eva", "naflexvit", "vision_transformer_relpos", "beit", "vision_transformer_hybrid", "deit")
SMALL = dict(depth=2, embed_dim=64, num_heads=4, num_classes=10)
RTOL = 1e-5


@dataclass
class ZooResult:
    name: str
    module: str
    status: str  # "exact", "refused", "different", "unbuildable"
    detail: str = ""  # the refusal message, the error, or the hooked flags
    err: float = 0.0
    hooks: str = ""  # hook points beyond a plain ViT's (blocks.L. for every block), exact names only


def zoo_names() -> list[tuple[str, str]]:
    """(module, name) for every registered architecture of MODULES."""
    return [(m, n) for m in MODULES for n in timm.list_models(module=m)]


def _patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """Pixels per token (a hybrid CNN stem: its feature stride times the patch size)."""
    embed = getattr(model, "patch_embed", None) or getattr(model, "embeds")  # NaFlexVit: embeds
    ratio = getattr(embed, "feature_ratio", (1, 1))
    return tuple(int(r) * p for r, p in zip(ratio, embed.patch_size))


def _create(name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model at the small size; options that cannot shrink to it are adapted:
    an odd packed-SwiGLU width (width 96) and per-block grouped-query heads (2 kv heads)."""
    try:
        return timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})
    except AssertionError as err:
        if "feature dim" in str(err):  # a hybrid stem without projection: the width is the CNN's
            width = int(str(err).split("(")[1].split()[0])
            return timm.create_model(name, pretrained=False, **{**SMALL, "embed_dim": width, **kwargs})
        if "num_kv_heads" in str(err):
            return timm.create_model(name, pretrained=False, **{**SMALL, "num_kv_heads": 2, **kwargs})
        return timm.create_model(name, pretrained=False, **{**SMALL, "embed_dim": 96, **kwargs})


def small_variant(name: str, seed: int = 0) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The timm model `name` at depth 2, width 64, 4 heads, 10 classes and a 4x4 (or smaller)
    patch grid, with every parameter randomised (norm weights around 1). Returns it and the
    input image size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = _create(name)
        ph, pw = _patch_size(probe)
        size = (4 * ph, 3 * pw)  # not square: catches transposed grids
        model = _create(name, img_size=size)
    return randomize_(model.eval(), seed), size


def check(name: str, module: str = "") -> ZooResult:
    """Build `name` small, load it into HookedViT and compare logits on both attention paths."""
    from hooked_vit import HookedViT
    from hooked_vit.errors import UnsupportedModelError

    try:
        timm_model, size = small_variant(name)
    except Exception as err:  # timm itself cannot build the small variant
        return ZooResult(name, module, "unbuildable", f"{type(err).__name__}: {err}".splitlines()[0])
    try:
        model = HookedViT.from_timm(timm_model)
    except UnsupportedModelError as err:
        return ZooResult(name, module, "refused", str(err).splitlines()[0])
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = timm_model(x)
        fused = model(x)
        with model.hooks([("blocks.0.attn.hook_pattern", lambda t, hook: t)]):  # forces the explicit path
            explicit = model(x)
    err = max(rel_err(fused, ref), rel_err(explicit, ref))
    if fused.shape != ref.shape or not err < RTOL:
        return ZooResult(name, module, "different", f"rel err {err:.2e}", err)
    return ZooResult(name, module, "exact", _flags(model), err, ", ".join(extra_hooks(model)))


def _per_layer(name: str) -> str:
    import re

    return re.sub(r"^blocks\.\d+\.", "blocks.L.", name)


@functools.lru_cache(maxsize=None)
def _standard_hooks() -> frozenset:
    """The hook points of a plain ViT (class token, learned positions, LayerNorm, MLP, token pooling)."""
    from hooked_vit import HookedViT
    from hooked_vit.config import HookedViTConfig

    cfg = HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2, img_size=4, patch_size=2)
    return frozenset(_per_layer(n) for n in HookedViT(cfg).hook_dict)


def extra_hooks(model) -> list[str]:
    """The model's hook points that a plain ViT lacks, then "no NAME" for a plain ViT's that
    it lacks (e.g. a parallel block's resid_mid): the documentation's hook points column."""
    own = {_per_layer(n) for n in model.hook_dict}
    return sorted(own - _standard_hooks()) + [f"no {n}" for n in sorted(_standard_hooks() - own)]


def _flags(model) -> str:
    """The HookedViTConfig fields that differ from their defaults (the documentation's options column)."""
    from dataclasses import MISSING, fields

    from hooked_vit.config import HookedViTConfig

    skip = {"d_model", "n_layers", "n_heads", "d_mlp", "n_classes", "img_size", "patch_size", "d_head",
            "model_name", "data_config", "label_names", "class_names", "device", "rope_options",
            "attn_pool_heads", "attn_pool_d_mlp", "in_chans"}
    out = []
    for f in fields(HookedViTConfig):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(model.cfg, f.name)
        if value != default:
            out.append(f"{f.name}={value!r}")
    return ", ".join(out)


@functools.lru_cache(maxsize=None)
def results() -> tuple[ZooResult, ...]:
    """Every zoo name checked once per session."""
    torch.manual_seed(0)
    return tuple(check(name, module) for module, name in zoo_names())


def summary(rs: Optional[tuple[ZooResult, ...]] = None) -> dict[str, dict[str, int]]:
    """{module: {status: count}} plus a "total" row."""
    rs = results() if rs is None else rs
    out: dict[str, dict[str, int]] = {}
    for r in rs:
        for key in (r.module, "total"):
            row = out.setdefault(key, {"exact": 0, "refused": 0, "different": 0, "unbuildable": 0, "names": 0})
            row[r.status] += 1
            row["names"] += 1
    return out


if __name__ == "__main__":
    import collections
    import sys

    torch.set_num_threads(1)
    rs = results()
    for key, row in summary(rs).items():
        print(key, row)
    reasons = collections.Counter(r.detail.split(" (")[0] for r in rs if r.status != "exact")
    for reason, n in reasons.most_common():
        print(f"{n:4d}  {reason}")
    if "-v" in sys.argv:
        for r in rs:
            print(r.status, r.name, r.detail)
