"""Sparse autoencoders and transcoders: one module, four activation functions.

* ``relu``: ReLU + L1 penalty weighted by decoder norms (Bricken et al. 2023, "Towards
  Monosemanticity", transformer-circuits.pub/2023/monosemantic-features).
* ``topk``: keep the k largest pre-activations (Gao et al. 2024, "Scaling and evaluating
  sparse autoencoders", arXiv:2406.04093), with their AuxK loss on dead features.
* ``batchtopk``: keep the k * batch largest over the whole batch (Bussmann et al. 2024,
  arXiv:2412.06410); at inference a threshold estimated during training.
* ``jumprelu``: ``z * (z > theta)`` with a learned per-feature threshold, trained with
  straight-through estimators of the L0 penalty (Rajamanoharan et al. 2024, arXiv:2407.14435).

An SAE reconstructs its input (``d_out == d_in``, input centred by ``b_dec`` as SAELens's
``apply_b_dec_to_input``); a transcoder (Dunefsky et al. 2024, arXiv:2406.11944) reads one
hook (the MLP input) and predicts another (the MLP output), so ``d_out`` may differ and the
input is not centred. Parameter names and shapes follow SAELens: W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class DictionaryConfig:
    """What defines a dictionary. ``hook_out`` set makes it a transcoder (hook_name -> hook_out)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 16  # topk / batchtopk
    hook_name: str = ""
    hook_out: Optional[str] = None
    d_out: Optional[int] = None
    tokens: str = "all"  # which token positions it was trained on: all | cls | patch
    model_name: str = ""
    jumprelu_bandwidth: float = 0.05  # width of the rectangle kernel of the STE
    jumprelu_init_threshold: float = 0.01
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.tokens not in ("all", "cls", "patch"):
            raise ValueError(f"tokens must be all, cls or patch, got {self.tokens!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.hook_out is None and self.d_out != self.d_in:
            raise ValueError("an SAE reconstructs its input (d_out == d_in); set hook_out for a transcoder")

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out is not None

    def to_dict(self) -> dict:
        return asdict(self)


class _JumpStep(torch.autograd.Function):
    """Heaviside step H(z - theta) with the rectangle-kernel pseudo-derivative wrt theta
    (Rajamanoharan et al. 2024, eq. 11): d/dtheta = -K((z - theta) / eps) / eps."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        kernel = ((z - theta).abs() < ctx.eps / 2).to(z.dtype) / ctx.eps
        return None, (-kernel * grad).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta): exact gradient wrt z, the STE pseudo-derivative wrt theta (eq. 10)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        kernel = ((z - theta).abs() < ctx.eps / 2).to(z.dtype) / ctx.eps
        return grad * (z > theta).to(z.dtype), (-theta * kernel * grad).sum(0), None


class SparseDictionary(nn.Module):
    """An SAE or transcoder. ``encode`` -> feature activations, ``decode`` -> output.

    Inputs are [..., d_in]; any leading dims (batch, tokens) are kept.
    """

    def __init__(self, cfg: DictionaryConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        # Decoder rows of unit norm, encoder its transpose (Gao et al. 2024, sec. 2.4): a good start.
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        w_enc = w_dec.T.clone() if not cfg.is_transcoder else torch.randn(cfg.d_in, cfg.d_sae, generator=gen)
        if cfg.is_transcoder:
            w_enc = w_enc / w_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))
        # BatchTopK's inference threshold: a running mean of the batch's smallest kept value.
        self.register_buffer("batch_threshold", torch.tensor(-1.0))

    @property
    def threshold(self) -> Tensor:
        """Per-feature threshold of JumpReLU (and BatchTopK at inference)."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        return self.batch_threshold.clamp_min(0).expand(self.cfg.d_sae)

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"dictionary expects inputs [..., {self.cfg.d_in}], got {tuple(x.shape)}")
        centred = x if self.cfg.is_transcoder else x - self.b_dec
        return centred.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activate(self.pre_acts(x))

    def activate(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(z)
        if arch == "topk":
            return _topk(torch.relu(z), self.cfg.k)
        if arch == "batchtopk":
            if self.training:
                return self._batch_topk(torch.relu(z))
            if float(self.batch_threshold) < 0:  # never trained: fall back to per-row top-k
                return _topk(torch.relu(z), self.cfg.k)
            return z * (z > self.batch_threshold)
        flat = z.reshape(-1, z.shape[-1])
        return _JumpReLU.apply(flat, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).reshape(z.shape)

    def _batch_topk(self, acts: Tensor) -> Tensor:
        flat = acts.reshape(-1)
        n_keep = min(self.cfg.k * acts.reshape(-1, acts.shape[-1]).shape[0], flat.numel())
        values, idx = flat.topk(n_keep)
        kept = torch.zeros_like(flat).scatter(0, idx, values).reshape(acts.shape)
        with torch.no_grad():  # Bussmann et al. 2024, sec. 3: threshold = mean smallest kept value
            smallest = values[values > 0].min() if (values > 0).any() else values.new_tensor(0.0)
            old = self.batch_threshold
            self.batch_threshold.copy_(smallest if old < 0 else 0.99 * old + 0.01 * smallest)
        return kept

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Decoder rows to unit norm, so sparsity penalties cannot be gamed by scaling."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row (keeps the unit-norm constraint
        to first order; Bricken et al. 2023)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(1, keepdim=True) * w)


def _topk(acts: Tensor, k: int) -> Tensor:
    values, idx = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter(-1, idx, values)
