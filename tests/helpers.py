"""Shared test helpers: small randomised versions of every supported timm family, images."""

from __future__ import annotations

import timm
import torch

# name -> (timm overrides, input image size). Each is the registered timm architecture
# (block type, pooling, tokens, norms, activations as timm defines them) shrunk to 2
# blocks and a small width so the suite stays fast.
SMALL = dict(depth=2, embed_dim=48, num_heads=4, num_classes=10)
FAMILIES = {
    "vit_tiny_patch16_224": (dict(img_size=48), 48),
    "vit_base_patch32_224": (dict(img_size=64), 64),
    "vit_base_patch8_224": (dict(img_size=24), 24),
    "vit_large_patch14_224": (dict(img_size=28), 28),
    "vit_base_patch16_224_miil": (dict(img_size=48), 48),
    "vit_base_patch16_rpn_224": (dict(img_size=48), 48),
    "deit_tiny_patch16_224": (dict(img_size=48), 48),
    "deit_tiny_distilled_patch16_224": (dict(img_size=48), 48),
    "vit_base_patch16_reg4_gap_256": (dict(img_size=48), 48),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=42), 42),
    "vit_small_patch14_dinov2": (dict(img_size=42), 42),
    "deit3_small_patch16_224": (dict(img_size=48), 48),
    "vit_base_patch16_clip_224": (dict(img_size=48), 48),
    "vit_base_patch16_clip_quickgelu_224": (dict(img_size=48), 48),
}
FAMILIES = {k: v for k, v in FAMILIES.items() if k in timm.list_models()}


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Randomise every parameter, LayerNorm weights and biases included.

    timm's init leaves norm weights at 1 and many biases at 0, which would hide bugs in
    how those parameters are used. Norm weights are drawn around 1 so activations keep a
    sensible scale through the blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def make_timm(name: str, seed: int = 0, **extra) -> tuple[torch.nn.Module, int]:
    overrides, size = FAMILIES[name]
    model = timm.create_model(name, pretrained=False, **{**SMALL, **overrides, **extra})
    return randomize_(model.eval(), seed), size


def timm_pair(arch: str, options: dict, size: tuple[int, int], edit=None) -> tuple:
    """(timm model, HookedViT.from_timm of it, images [2, 3, *size]): timm's `arch` built from
    `options` (edited by `edit` when given), every parameter randomised, in eval mode."""
    import warnings

    from hooked_vit import HookedViT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_model = timm.create_model(arch, pretrained=False, **options)
    if edit is not None:
        timm_model = edit(timm_model)
    timm_model = randomize_(timm_model.eval(), seed=3)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    return timm_model, HookedViT.from_timm(timm_model), x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the equivalence tests' relative error."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_hf_clip_folder(folder, projection_dim: int = 24):
    """A random-weight transformers CLIPModel (32 x 32 images, patch 8) saved to `folder` with a
    tiny character-level CLIPTokenizer, so its text tower works offline; returns the folder."""
    import string

    import transformers as T

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    config = T.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    randomize_(T.CLIPModel(config).eval(), std=0.2).save_pretrained(folder)
    T.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


class KeepPatches(torch.nn.Module):
    """timm's patch-dropout slot with chosen patches kept (`keep` [b, k], patch indices) instead of
    random ones; `with_indices` returns (tokens, keep) as eva's PatchDropoutWithIndices does."""

    def __init__(self, keep: torch.Tensor, n_prefix: int, with_indices: bool = False):
        super().__init__()
        self.keep, self.n_prefix, self.with_indices = keep, n_prefix, with_indices

    def forward(self, x):
        prefix, patches = x[:, : self.n_prefix], x[:, self.n_prefix:]
        kept = torch.cat([prefix, torch.gather(patches, 1, self.keep[..., None].expand(-1, -1, x.shape[-1]))], 1)
        return (kept, self.keep) if self.with_indices else kept


def timm_on_kept_patches(timm_model: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor, n_prefix: int,
                         with_indices: bool = False) -> torch.Tensor:
    """timm's forward with its patch-dropout slot keeping the patches `keep` [b, k] (`KeepPatches`),
    the slot restored afterwards."""
    original = timm_model.patch_drop
    timm_model.patch_drop = KeepPatches(keep, n_prefix, with_indices)
    try:
        with torch.no_grad():
            return timm_model(x)
    finally:
        timm_model.patch_drop = original


def keep_mask_of(keep: torch.Tensor, n_prefix: int, n_ctx: int) -> torch.Tensor:
    """HookedViT's keep_mask [b, n_ctx] for the prefix tokens and the patches `keep` [b, k]."""
    mask = torch.zeros(len(keep), n_ctx, dtype=torch.bool)
    mask[:, :n_prefix] = True
    return mask.scatter_(1, keep + n_prefix, True)
