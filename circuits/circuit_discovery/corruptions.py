"""Corruptions that fit images: the corrupted run of patching (Zhang & Nanda 2024, "Towards
Best Practices of Activation Patching", recommend a second input, "symmetric token
replacement", over Gaussian noise; both are here).

- "shuffle": each image replaced by another image of the batch (a second image).
- "blur": Gaussian blur (removes shape detail, keeps colour / background).
- "noise": additive Gaussian noise (Meng et al. 2022's corruption).
- "mean": the batch-mean image for every image.
- `swap_background`: the object on another image's background (needs the object masks).
Clips [b, t, c, h, w] of a video model work with all four above (blur acts on each frame),
and three act on their time axis only (`circuits.video`): "reverse_frames" (played
backwards), "shuffle_frames" (the frames out of order), "freeze_frames" (the first frame held).
Token removal and attention perturbation act inside the model: see `circuits.token_removal`.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.method_names import CIRCUIT_CORRUPTIONS, CLIP_CORRUPTIONS
from circuits.video import freeze_frames, reverse_frames, shuffle_frames
from hooked_vit.errors import UserError


def shuffle(images: Float[Tensor, "b c h w"], seed: int = 0) -> Tensor:
    """Every image replaced by a different image of the batch (a random derangement)."""
    b = len(images)
    if b < 2:
        raise UserError("the 'shuffle' corruption needs a batch of at least 2 images")
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, b, (1,), generator=gen))
    perm = torch.randperm(b, generator=gen)
    order = torch.empty(b, dtype=torch.long)
    order[perm] = perm.roll(shift)  # a cycle over a random order: no image maps to itself
    return images[order.to(images.device)]


def blur(images: Float[Tensor, "b c h w"], sigma: float = 2.0) -> Tensor:
    """Gaussian blur of every image; clips [b, t, c, h, w] are blurred frame by frame."""
    if sigma <= 0:
        raise UserError(f"blur sigma must be > 0, got {sigma}")
    if images.ndim == 5:
        b = len(images)
        return einops.rearrange(blur(einops.rearrange(images, "b t c h w -> (b t) c h w"), sigma),
                                "(b t) c h w -> b t c h w", b=b)
    if images.ndim != 4:
        raise UserError(f"blur needs images [b, c, h, w] or clips [b, t, c, h, w], got shape {tuple(images.shape)}")
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def noise(images: Float[Tensor, "b c h w"], std: float = 1.0, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return images + std * torch.randn(images.shape, generator=gen).to(images)


def mean(images: Float[Tensor, "b c h w"]) -> Tensor:
    return images.mean(0, keepdim=True).expand_as(images).clone()


def swap_background(images: Float[Tensor, "b c h w"], masks: Bool[Tensor, "b h w"],
                    donors: Float[Tensor, "b c h w"]) -> Tensor:
    """The object pixels (mask True) of `images` on the background of `donors`: a
    counterfactual that changes only the background (SyntheticShapes gives the masks)."""
    if masks.shape != (images.shape[0], *images.shape[2:]) or donors.shape != images.shape:
        raise UserError(f"masks must be [b, h, w] and donors [b, c, h, w] for images {tuple(images.shape)}; "
                         f"got {tuple(masks.shape)} and {tuple(donors.shape)}")
    return torch.where(masks[:, None].to(images.device), images, donors)


CORRUPTIONS = {"shuffle": shuffle, "blur": blur, "noise": noise, "mean": mean, "reverse_frames": reverse_frames,
               "shuffle_frames": shuffle_frames, "freeze_frames": freeze_frames}
assert tuple(CORRUPTIONS) == CIRCUIT_CORRUPTIONS, "circuits.method_names must list the corruptions, in order"


def corrupt(images: Float[Tensor, "b c h w"], name: str, **kwargs) -> Tensor:
    """The corrupted images for `images` by corruption `name` (see the module docstring)."""
    check_corruption(name, clips=images.ndim == 5, inputs=f"inputs of shape {tuple(images.shape)} are not clips")
    return CORRUPTIONS[name](images, **kwargs)


def check_corruption(name: str, clips: bool, inputs: str) -> None:
    """Refuse an unknown corruption, or one of CLIP_CORRUPTIONS for inputs that are not clips
    (`inputs` says why, e.g. the model is an image model), before any work is done."""
    if name not in CORRUPTIONS:
        raise UserError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    if name in CLIP_CORRUPTIONS and not clips:
        raise UserError(f"corruption {name!r} acts on the frames of clips [b, t, c, h, w] (video models); "
                         f"{inputs}: use shuffle, blur, noise or mean")
