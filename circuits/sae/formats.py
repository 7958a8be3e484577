"""Dictionaries on disk: SAELens's format (read and write) and ViT-Prisma's (read). Never unpickled.

SAELens (github.com/jbloomAus/SAELens, `SAE.save_model` / `SAE.load_from_disk`): a folder
with ``cfg.json`` and ``sae_weights.safetensors`` holding W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] (+ ``threshold`` [d_sae] for JumpReLU). cfg fields read
and written: architecture ("standard" = ReLU, "topk", "jumprelu"), d_in, d_sae, hook_name,
hook_layer, hook_head_index, model_name, dtype, device, apply_b_dec_to_input,
normalize_activations, activation_fn_str / activation_fn and activation_fn_kwargs {"k"} (or
a top-level "k"), and for transcoders hook_name_out, d_out. SAELens 6 also nests
model_name / hook_name under "metadata"; both places are read. BatchTopK is written the way
SAELens 6 stores it for inference, as JumpReLU with its threshold; our own fields (which
token positions, the exact architecture) go under "hooked_vit" and are ignored by SAELens.

ViT-Prisma (github.com/soniajoseph/ViT-Prisma, published vision SAEs): ``config.json`` with
d_in, d_sae or expansion_factor, hook_point, hook_point_layer, activation_fn_str
(relu/topk) and activation_fn_kwargs, and the same tensor names in a ``*.safetensors``
file. Its ``.pt`` checkpoints are pickles and are refused: convert them to safetensors first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save

from circuits.files import atomic_write_bytes, atomic_write_text
from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from hooked_vit.errors import UserError

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
_TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def _hook_layer(hook: str) -> int:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1


def save_saelens(sae: SparseDictionary, folder: str | Path) -> Path:
    """Write `sae` as a SAELens folder (atomically, file by file)."""
    c, folder = sae.cfg, Path(folder)
    arch = _TO_SAELENS[c.architecture]
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
           "model_name": c.model_name, "hook_name": c.hook_name, "hook_layer": _hook_layer(c.hook_name),
           "hook_head_index": None, "apply_b_dec_to_input": not c.is_transcoder,
           "normalize_activations": "none", "finetuning_scaling_factor": False,
           "activation_fn_str": "topk" if arch == "topk" else "relu",
           "activation_fn": "topk" if arch == "topk" else "relu",
           "activation_fn_kwargs": {"k": c.k} if arch == "topk" else {},
           "metadata": {"model_name": c.model_name, "hook_name": c.hook_name},
           "hooked_vit": {"architecture": c.architecture, "tokens": c.tokens, "k": c.k,
                          "jumprelu_bandwidth": c.jumprelu_bandwidth, **c.extra}}
    if arch == "topk":
        cfg["k"] = c.k
    if c.is_transcoder:
        cfg.update(hook_name_out=c.hook_out, hook_layer_out=_hook_layer(c.hook_out), d_out=c.d_out)
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().float().cpu().contiguous()
    atomic_write_bytes(folder / WEIGHTS, save(tensors))
    atomic_write_text(folder / CFG, json.dumps(cfg, indent=2))
    return folder


def load_saelens(folder: str | Path) -> SparseDictionary:
    """Read a SAELens folder (ours or SAELens's own)."""
    folder = Path(folder)
    if not (folder / CFG).exists() or not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} is not a SAELens folder: it needs {CFG} and {WEIGHTS}")
    cfg = json.loads((folder / CFG).read_text())
    meta = cfg.get("metadata") or {}
    ours = cfg.get("hooked_vit") or {}
    arch = ours.get("architecture") or _from_saelens_arch(cfg)
    k = ours.get("k") or cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                         "fold the scaling into the weights first")
    if cfg.get("apply_b_dec_to_input") is False and not cfg.get("hook_name_out"):
        raise UserError(f"{folder}: an SAE with apply_b_dec_to_input=false is not supported")
    return _build(folder / WEIGHTS, arch, k, cfg["d_in"], cfg["d_sae"], cfg.get("hook_name") or meta.get("hook_name", ""),
                  cfg.get("hook_name_out"), cfg.get("d_out"), ours.get("tokens", "all"),
                  cfg.get("model_name") or meta.get("model_name", ""), ours.get("jumprelu_bandwidth", 0.05))


def _from_saelens_arch(cfg: dict) -> str:
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "standard":
        if fn not in ("relu", "topk"):
            raise UserError(f"activation function {fn!r} is not supported (relu or topk)")
        return "topk" if fn == "topk" else "relu"
    if arch in ("topk", "jumprelu"):
        return arch
    raise UserError(f"SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")


def _build(weights: Path, arch: str, k: Optional[int], d_in: int, d_sae: int, hook: str, hook_out, d_out, tokens: str,
           model_name: str, bandwidth: float) -> SparseDictionary:
    tensors = load_file(weights)  # safetensors: plain tensors, no code
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors)
    if missing:
        raise UserError(f"{weights} lacks {sorted(missing)} (SAELens tensor names W_enc, b_enc, W_dec, b_dec)")
    if arch == "jumprelu" and "threshold" not in tensors:
        raise UserError(f"{weights}: a JumpReLU dictionary needs a 'threshold' tensor")
    if arch in ("topk", "batchtopk") and not k:
        raise UserError(f"{weights.parent}: a {arch} dictionary's config gives no k (active features per token); "
                         "add \"k\" (or activation_fn_kwargs.k) to its config")
    k = int(k or 1)  # unused by the other architectures
    cfg = DictionaryConfig(d_in=int(d_in), d_sae=int(d_sae), architecture=arch, k=k, hook_name=hook,
                           hook_out=hook_out, d_out=int(d_out) if d_out else None, tokens=tokens,
                           model_name=model_name, jumprelu_bandwidth=bandwidth)
    sae = SparseDictionary(cfg)
    expect = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_out), "b_dec": (cfg.d_out,)}
    with torch.no_grad():
        for name, shape in expect.items():
            if tuple(tensors[name].shape) != shape:
                raise UserError(f"{weights}: {name} is {tuple(tensors[name].shape)}, the config implies {shape}")
            getattr(sae, name).copy_(tensors[name].float())
        if arch == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].float().clamp_min(1e-12).log())
        if arch == "batchtopk" and "threshold" in tensors:
            sae.batch_threshold.copy_(tensors["threshold"].float().max())
    return sae.eval()


def load_vit_prisma(folder: str | Path) -> SparseDictionary:
    """Read a ViT-Prisma SAE folder (config.json + a safetensors file of W_enc, b_enc, W_dec, b_dec)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a ViT-Prisma SAE folder: it needs config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*.pt*"))
        raise UserError(f"{folder} has no .safetensors weights{f' (only pickles {pickles})' if pickles else ''}; "
                         "pickles are never loaded: convert with safetensors.torch.save_file on a trusted machine")
    cfg = json.loads((folder / "config.json").read_text())
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("d_sae") or d_in * int(cfg["expansion_factor"]))
    fn = cfg.get("activation_fn_str", "relu")
    if fn not in ("relu", "topk"):
        raise UserError(f"{folder}: activation_fn_str {fn!r} is not supported (relu or topk)")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    return _build(weights[-1], fn, k, d_in, d_sae, cfg.get("hook_point", ""), None, None, "all",
                  cfg.get("model_name", ""), 0.05)


def load_dictionary(path: str | Path) -> SparseDictionary:
    """A SAELens or ViT-Prisma folder, whichever it is."""
    path = Path(path)
    if (path / CFG).exists():
        return load_saelens(path)
    if (path / "config.json").exists():
        return load_vit_prisma(path)
    raise FileNotFoundError(f"{path} holds neither {CFG} (SAELens) nor config.json (ViT-Prisma)")
