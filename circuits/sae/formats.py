"""Dictionaries on disk: SAELens's format (read and write) and ViT-Prisma's (read). Never unpickled.

SAELens (github.com/decoderesearch/SAELens 6.x, `SAE.save_model` / `SAE.load_from_disk`): a
folder with ``cfg.json`` and ``sae_weights.safetensors``. Every field that changes what the
dictionary computes is read with its meaning or refused with a message naming it:

* ``architecture``: standard (ReLU; or ``activation_fn`` topk before 6.0), topk, jumprelu,
  gated, the training folders batchtopk / matryoshka_batchtopk (their ``topk_threshold``
  becomes the inference threshold; an untrained one, <= 0, is refused), and the transcoders
  transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder (``d_out``,
  ``hook_name_out``, ``W_skip [d_out, d_in]``).
* ``rescale_acts_by_decoder_norm`` (TopK / BatchTopK training checkpoints, SAELens's default):
  the decoder norms are folded into the encoder (W_enc, b_enc times ||W_dec||, W_dec unit rows),
  the same function with plain TopK.
* ``dtype``: parameters are held and computed in it; inputs are cast to it (as SAELens).
* ``apply_b_dec_to_input``: honoured (false: the input is not centred).
* ``normalize_activations``: ``constant_norm_rescale`` and ``layer_norm`` run at run time as in
  SAELens; ``expected_average_only_in`` needs its scaling factor (``activation_scaler.json`` in
  the folder, as SAELens's trainer writes with its checkpoints, or ``scaling_factor=``), which
  is folded into the weights; ``covariance_whitening`` is refused.
* refused: ``hook_head_index``, ``reshape_activations`` other than none, a fine-tuning
  ``scaling_factor``, negative JumpReLU thresholds, any tensor the architecture does not have.

Written: the same layout, in the dictionary's dtype, SAELens's architecture names (BatchTopK
as jumprelu with its threshold, as SAELens 6 saves it for inference; an untrained BatchTopK as
topk with its k, never as a dense threshold 0). SAELens has no TopK transcoder: those are
written as ``topk_transcoder`` / ``topk_skip_transcoder``, which only hooked-vit reads. Our own fields go under
"hooked_vit" and are ignored by SAELens.

ViT-Prisma (github.com/soniajoseph/ViT-Prisma): ``config.json`` with d_in, d_sae or
expansion_factor, hook_point, activation_fn_str (relu/topk) and activation_fn_kwargs, dtype,
normalize_activations (as above), and the same tensor names in a ``*.safetensors`` file. Its
``.pt`` checkpoints are pickles and are refused: convert them to safetensors first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save

from hooked_vit.errors import CheckpointError

from circuits.files import atomic_write_bytes, atomic_write_text
from circuits.sae.dictionaries import DTYPES, DictionaryConfig, SparseDictionary

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
_SAELENS_VERSION = "6.0.0"  # the config layout written (metadata nested, activation fields top level)
# SAELens architecture -> (ours, transcoder?, skip?)
_FROM_SAELENS = {"standard": ("relu", False, False), "topk": ("topk", False, False), "jumprelu": ("jumprelu", False, False),
                 "gated": ("gated", False, False), "batchtopk": ("batchtopk", False, False),
                 "matryoshka_batchtopk": ("batchtopk", False, False), "transcoder": ("relu", True, False),
                 "skip_transcoder": ("relu", True, True), "jumprelu_transcoder": ("jumprelu", True, False),
                 "jumprelu_skip_transcoder": ("jumprelu", True, True),
                 "topk_transcoder": ("topk", True, False), "topk_skip_transcoder": ("topk", True, True)}  # last two: ours


def _hook_layer(hook: str) -> int:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1


def _saelens_architecture(c: DictionaryConfig, trained_threshold: bool) -> str:
    arch = c.architecture
    if arch == "batchtopk":
        arch = "jumprelu" if trained_threshold else "topk"
    if not c.is_transcoder:
        return {"relu": "standard"}.get(arch, arch)
    base = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "topk": "topk_transcoder"}[arch]
    return base.replace("transcoder", "skip_transcoder") if c.skip else base


def save_saelens(sae: SparseDictionary, folder: str | Path) -> Path:
    """Write `sae` as a SAELens folder (atomically, file by file)."""
    c, folder = sae.cfg, Path(folder)
    trained = c.architecture == "batchtopk" and float(sae.batch_threshold) >= 0
    arch = _saelens_architecture(c, trained)
    meta = {"model_name": c.model_name, "hook_name": c.hook_name, "sae_lens_version": _SAELENS_VERSION,
            "sae_lens_training_version": _SAELENS_VERSION}
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype, "device": "cpu",
           "apply_b_dec_to_input": bool(c.apply_b_dec_to_input), "normalize_activations": c.normalize_activations,
           "reshape_activations": "none", "metadata": meta, "model_name": c.model_name, "hook_name": c.hook_name,
           "hook_layer": _hook_layer(c.hook_name),
           "hooked_vit": {"architecture": c.architecture, "tokens": c.tokens, "k": c.k,
                          "jumprelu_bandwidth": c.jumprelu_bandwidth, **c.extra}}
    if arch in ("topk", "topk_transcoder"):
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if c.is_transcoder:
        cfg["d_out"] = c.d_out
        meta.update(hook_name_out=c.hook_out)
        cfg.update(hook_name_out=c.hook_out, hook_layer_out=_hook_layer(c.hook_out))
    names = ["W_enc", "W_dec", "b_dec"] + (["b_gate", "r_mag", "b_mag"] if c.architecture == "gated" else ["b_enc"])
    tensors = {name: getattr(sae, name).detach() for name in names + (["W_skip"] if c.skip else [])}
    if "jumprelu" in arch:
        tensors["threshold"] = sae.threshold.detach()
    tensors = {k: v.to(DTYPES[c.dtype]).cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(folder / WEIGHTS, save(tensors))
    atomic_write_text(folder / CFG, json.dumps(cfg, indent=2))
    return folder


def load_saelens(folder: str | Path, scaling_factor: Optional[float] = None) -> SparseDictionary:
    """Read a SAELens folder (ours or SAELens's own). `scaling_factor`: the activation scaling
    of an ``expected_average_only_in`` dictionary, when the folder has no activation_scaler.json."""
    folder = Path(folder)
    if not (folder / CFG).exists() or not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} is not a SAELens folder: it needs {CFG} and {WEIGHTS}")
    cfg = json.loads((folder / CFG).read_text())
    meta = cfg.get("metadata") or {}
    ours = cfg.get("hooked_vit") or {}

    def get(key, default=None):
        return cfg[key] if cfg.get(key) is not None else meta.get(key, default)

    where = f"{folder}/{CFG}"
    arch_name = cfg.get("architecture", "standard")
    if arch_name not in _FROM_SAELENS:
        raise CheckpointError(f"{where}: architecture {arch_name!r} is not supported ({', '.join(_FROM_SAELENS)})")
    arch, transcoder, skip = _FROM_SAELENS[arch_name]
    fn = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch_name == "standard" and fn not in ("relu", "topk"):
        raise CheckpointError(f"{where}: activation_fn {fn!r} is not supported (relu or topk)")
    if arch_name == "standard" and fn == "topk":
        arch = "topk"
    arch = ours.get("architecture") or arch
    k = ours.get("k") or cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if get("hook_head_index") is not None:
        raise CheckpointError(f"{where}: hook_head_index={get('hook_head_index')} (an SAE on one head) is not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise CheckpointError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise CheckpointError(f"{where}: finetuning_scaling_factor=true is not supported")
    hook_out = get("hook_name_out") if transcoder else None
    if transcoder and not hook_out:
        raise CheckpointError(f"{where}: a {arch_name} needs hook_name_out (in metadata)")
    tensors = load_file(folder / WEIGHTS)  # safetensors: plain tensors, no code
    norm, scale = _normalization(cfg.get("normalize_activations"), where, folder, scaling_factor)
    dc = dict(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), architecture=arch, hook_name=get("hook_name", "") or "",
              hook_out=hook_out, d_out=int(cfg["d_out"]) if transcoder else None, tokens=ours.get("tokens", "all"),
              model_name=get("model_name", "") or "", jumprelu_bandwidth=ours.get("jumprelu_bandwidth", 0.05),
              dtype=_dtype(cfg.get("dtype", "float32"), where), normalize_activations=norm, skip=skip,
              apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)))
    if arch_name == "matryoshka_batchtopk":
        dc["extra"] = {"matryoshka_widths": cfg.get("matryoshka_widths")}
    return _build(folder / WEIGHTS, tensors, dc, k, scale=scale, rescale=bool(cfg.get("rescale_acts_by_decoder_norm")))


def _dtype(name: str, where: str) -> str:
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"{where}: dtype {name!r} is not supported ({', '.join(DTYPES)})")
    return name


def _normalization(mode, where: str, folder: Path, scaling_factor: Optional[float]) -> tuple[str, Optional[float]]:
    """(run-time normalization, activation scaling factor to fold) of `normalize_activations`."""
    mode = {None: "none", False: "none", True: "expected_average_only_in"}.get(mode, mode)
    if mode in ("none", "constant_norm_rescale", "layer_norm"):
        return mode, None
    if mode != "expected_average_only_in":
        raise CheckpointError(f"{where}: normalize_activations={mode!r} is not supported "
                              "(none, expected_average_only_in, constant_norm_rescale, layer_norm)")
    if scaling_factor is None and (folder / SCALER).exists():
        scaling_factor = json.loads((folder / SCALER).read_text()).get("scaling_factor")
    if scaling_factor is None:
        raise CheckpointError(f"{where}: normalize_activations='expected_average_only_in' scales inputs by a factor "
                              f"that is not in the folder: write {{\"scaling_factor\": s}} to {folder / SCALER} "
                              "(s: SAELens's norm_scaling_factor of this release) or pass scaling_factor=s")
    return "none", float(scaling_factor)


def _build(weights: Path, tensors: dict, dc: dict, k, scale: Optional[float] = None,
           rescale: bool = False) -> SparseDictionary:
    arch = dc["architecture"]
    if arch in ("topk", "batchtopk") and not k:
        raise CheckpointError(f"{weights.parent}: a {arch} dictionary's config gives no k (active features per "
                              "token); add \"k\" (or activation_fn_kwargs.k) to its config")
    dc["k"] = max(1, int(round(float(k or 1))))  # unused by the other architectures
    cfg = DictionaryConfig(**dc)
    sae = SparseDictionary(cfg)
    dtype = DTYPES[cfg.dtype]
    t = {name: v.to(dtype) for name, v in tensors.items() if name != "scaling_factor"}
    if "scaling_factor" in tensors and not bool((tensors["scaling_factor"] == 1).all()):
        raise CheckpointError(f"{weights}: a scaling_factor tensor other than ones (fine-tuning scaling) is not supported")
    expect = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_out), "b_dec": (cfg.d_out,)}
    expect.update({n: (cfg.d_sae,) for n in (("b_gate", "r_mag", "b_mag") if arch == "gated" else ("b_enc",))})
    if cfg.skip:
        expect["W_skip"] = (cfg.d_out, cfg.d_in)
    optional = {"threshold": (cfg.d_sae,)} if arch in ("jumprelu", "batchtopk") else {}
    if arch == "batchtopk":
        optional["topk_threshold"] = ()
    missing = set(expect) - set(t)
    if missing:
        raise CheckpointError(f"{weights} lacks {sorted(missing)} (a {arch} dictionary has {sorted(expect)})")
    unknown = set(t) - set(expect) - set(optional)
    if unknown:
        raise CheckpointError(f"{weights} holds {sorted(unknown)}, which a {arch} dictionary does not have; not loaded")
    for name, shape in {**expect, **optional}.items():
        if name in t and tuple(t[name].shape) != shape:
            raise CheckpointError(f"{weights}: {name} is {tuple(t[name].shape)}, the config implies {shape}")
    threshold = _threshold(weights, arch, t)
    if scale is not None:  # SAELens's fold_activation_norm_scaling_factor
        t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * scale, t["W_dec"] / scale, t["b_dec"] / scale
        if rescale and threshold is not None:
            threshold = threshold / scale  # in units of hidden_pre * ||W_dec|| (SAELens #763)
    if rescale:  # rescale_acts_by_decoder_norm: fold the norms (SAELens's _fold_norm_topk)
        norms = t["W_dec"].norm(dim=-1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    with torch.no_grad():
        for name in expect:
            getattr(sae, name).copy_(t[name])
        if arch == "jumprelu":
            sae.set_threshold_(threshold)
        if arch == "batchtopk" and threshold is not None:
            sae.batch_threshold.copy_(threshold.max())
    return sae.eval()


def _threshold(weights: Path, arch: str, t: dict) -> Optional[torch.Tensor]:
    if arch == "jumprelu":
        if "threshold" not in t:
            raise CheckpointError(f"{weights}: a JumpReLU dictionary needs a 'threshold' tensor")
        if bool((t["threshold"] < 0).any()):
            raise CheckpointError(f"{weights}: negative JumpReLU thresholds are not supported")
        return t["threshold"]
    if arch != "batchtopk":
        return None
    if "topk_threshold" in t:  # a SAELens BatchTopK training checkpoint
        if float(t["topk_threshold"]) <= 0:
            raise CheckpointError(f"{weights}: topk_threshold is {float(t['topk_threshold'])}, i.e. never trained; "
                                  "as a threshold it would keep every positive feature (load a trained checkpoint)")
        return t["topk_threshold"].reshape(1)
    return t.get("threshold")  # ours, written as jumprelu; absent: an untrained one, kept top-k


def load_vit_prisma(folder: str | Path, scaling_factor: Optional[float] = None) -> SparseDictionary:
    """Read a ViT-Prisma SAE folder (config.json + a safetensors file of W_enc, b_enc, W_dec, b_dec)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a ViT-Prisma SAE folder: it needs config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*.pt*"))
        raise CheckpointError(f"{folder} has no .safetensors weights{f' (only pickles {pickles})' if pickles else ''}; "
                              "pickles are never loaded: convert with safetensors.torch.save_file on a trusted machine")
    cfg = json.loads((folder / "config.json").read_text())
    where = f"{folder}/config.json"
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("d_sae") or d_in * int(cfg["expansion_factor"]))
    fn = cfg.get("activation_fn_str", "relu")
    if fn not in ("relu", "topk"):
        raise CheckpointError(f"{where}: activation_fn_str {fn!r} is not supported (relu or topk)")
    if cfg.get("hook_point_head_index") is not None:
        raise CheckpointError(f"{where}: hook_point_head_index (an SAE on one head) is not supported")
    norm, scale = _normalization(cfg.get("normalize_activations", "none"), where, folder, scaling_factor)
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    dc = dict(d_in=d_in, d_sae=d_sae, architecture=fn, hook_name=cfg.get("hook_point", ""),
              model_name=cfg.get("model_name", ""), dtype=_dtype(cfg.get("dtype", "float32"), where),
              normalize_activations=norm)
    return _build(weights[-1], load_file(weights[-1]), dc, k, scale=scale)


def load_dictionary(path: str | Path, scaling_factor: Optional[float] = None) -> SparseDictionary:
    """A SAELens or ViT-Prisma folder, whichever it is."""
    path = Path(path)
    if (path / CFG).exists():
        return load_saelens(path, scaling_factor)
    if (path / "config.json").exists():
        return load_vit_prisma(path, scaling_factor)
    raise FileNotFoundError(f"{path} holds neither {CFG} (SAELens) nor config.json (ViT-Prisma)")
