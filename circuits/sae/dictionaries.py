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
b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae]; a skip transcoder
adds W_skip [d_out, d_in]; a gated SAE (Rajamanoharan et al. 2024, arXiv:2404.16014; read and
written, not trained) has b_gate, r_mag, b_mag instead of b_enc.

Hook points as SAELens's SAE: hook_sae_input, hook_sae_acts_pre, hook_sae_acts_post,
hook_sae_recons, hook_sae_error, hook_sae_output. ``forward`` follows SAELens's
``SAE.forward``: with ``use_error_term`` the error is computed from the *unedited* input
without gradient and without hooks, so edits at hook_sae_acts_post reach the output and
gradients flow through the dictionary path only (Marks et al. 2024, arXiv:2403.19647, A.3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from hooked_vit.saes import hooks_disabled
from hooked_vit.errors import UserError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")  # what train_dictionary trains
READ_ONLY = ("gated",)  # read, spliced and written, not trained here
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")  # SAELens's run-time ones
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    dtype: str = "float32"  # parameters are held and computed in it (SAELens's cfg.dtype)
    apply_b_dec_to_input: Optional[bool] = None  # default: True for an SAE, False for a transcoder
    normalize_activations: str = "none"  # none | constant_norm_rescale | layer_norm (SAELens)
    skip: bool = False  # a skip transcoder: + x @ W_skip.T (SAELens's SkipTranscoder)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES + READ_ONLY:
            raise UserError(f"architecture must be one of {ARCHITECTURES + READ_ONLY}, got {self.architecture!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise UserError(f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise UserError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise UserError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.tokens not in ("all", "cls", "patch"):
            raise UserError(f"tokens must be all, cls or patch, got {self.tokens!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.hook_out is None and self.d_out != self.d_in:
            raise UserError("an SAE reconstructs its input (d_out == d_in); set hook_out for a transcoder")
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.is_transcoder
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise UserError("apply_b_dec_to_input is not supported for transcoders (b_dec lives in the output space)")
        if self.skip and not self.is_transcoder:
            raise UserError("skip=True (W_skip) is for transcoders; set hook_out")
        if self.architecture == "gated" and self.is_transcoder:
            raise UserError("gated transcoders are not supported")

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


class SparseDictionary(HookedRootModule):
    """An SAE or transcoder. ``encode`` -> feature activations, ``decode`` -> output.

    Inputs are [..., d_in]; any leading dims (batch, tokens) are kept. Parameters live in
    ``cfg.dtype``; inputs are cast to it (as SAELens's ``process_sae_in``).
    """

    def __init__(self, cfg: DictionaryConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.use_error_term = False  # as SAELens's SAE; HookedViT.add_sae(use_error_term=) overrides it
        gen = torch.Generator().manual_seed(seed)
        # Decoder rows of unit norm, encoder its transpose (Gao et al. 2024, sec. 2.4): a good start.
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        w_enc = w_dec.T.clone() if not cfg.is_transcoder else torch.randn(cfg.d_in, cfg.d_sae, generator=gen)
        if cfg.is_transcoder:
            w_enc = w_enc / w_enc.norm(dim=0, keepdim=True)
        dtype = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(w_enc.to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype))  # SAELens: [d_out, d_in]
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
            self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
            self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        if cfg.architecture == "jumprelu":
            # float64: exp(log(t)) rounds back to t exactly for any float32/bf16/fp16 threshold t,
            # so thresholds survive load -> save bit for bit.
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold),
                                                         dtype=torch.float64))
        # BatchTopK's inference threshold: a running mean of the batch's smallest kept value (-1: untrained).
        self.register_buffer("batch_threshold", torch.tensor(-1.0))
        self.hook_sae_input = HookPoint()  # [..., d_in]
        self.hook_sae_acts_pre = HookPoint()  # [..., d_sae]
        self.hook_sae_acts_post = HookPoint()  # [..., d_sae]
        self.hook_sae_recons = HookPoint()  # [..., d_out]
        self.hook_sae_error = HookPoint()  # [..., d_out]
        self.hook_sae_output = HookPoint()  # [..., d_out]
        self._norm: Optional[tuple[Tensor, Tensor]] = None  # run-time normalization of the last encode
        self.setup()

    def train(self, mode: bool = True) -> "SparseDictionary":
        """Training mode; refused for what the trainer does not implement (gated, run-time normalization)."""
        if mode and (self.cfg.architecture in READ_ONLY or self.cfg.normalize_activations != "none"):
            raise UserError(f"a {self.cfg.architecture} dictionary with normalize_activations="
                             f"{self.cfg.normalize_activations!r} is read, spliced and written, not trained here "
                             f"(train one of {ARCHITECTURES} without normalization)")
        return super().train(mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def threshold(self) -> Tensor:
        """Per-feature threshold of JumpReLU (and BatchTopK at inference)."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp().to(self.dtype)
        return self.batch_threshold.clamp_min(0).to(self.dtype).expand(self.cfg.d_sae)

    def set_threshold_(self, threshold: Tensor) -> None:
        """Set JumpReLU thresholds so that ``self.threshold`` equals `threshold` bit for bit."""
        with torch.no_grad():
            self.log_threshold.copy_(threshold.to(self.dtype).double().log())

    def _normalize_in(self, x: Tensor) -> Tensor:
        """SAELens's run-time normalization (``constant_norm_rescale``, ``layer_norm``)."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            self._norm = (1 / coeff, torch.zeros_like(coeff))
            return x * coeff
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            self._norm = (std, mu)
            return (x - mu) / (std + 1e-5)
        return x

    def _normalize_out(self, y: Tensor) -> Tensor:
        if self.cfg.normalize_activations == "none" or self.cfg.is_transcoder:  # SAELens: not on transcoder outputs
            return y
        if self._norm is None:
            raise UserError(f"normalize_activations={self.cfg.normalize_activations!r}: decode needs the "
                             "statistics of an encode of the same input; call encode first")
        scale, shift = self._norm
        return y * scale + shift

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations of the (normalized) input: (x - b_dec) @ W_enc + b_enc; for a gated SAE
        the magnitude path's (W_enc * exp(r_mag), b_mag), as SAELens hooks at hook_sae_acts_pre."""
        if x.shape[-1] != self.cfg.d_in:
            raise UserError(f"dictionary expects inputs [..., {self.cfg.d_in}], got {tuple(x.shape)}")
        centred = self._centre(x)
        if self.cfg.architecture == "gated":
            return centred @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return centred @ self.W_enc + self.b_enc

    def _centre(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        sae_in = self._normalize_in(self.hook_sae_input(x.to(self.dtype)))
        z = self.hook_sae_acts_pre(self.pre_acts(sae_in))
        if self.cfg.architecture == "gated":  # gate on (x - b_dec) @ W_enc + b_gate > 0
            return self.hook_sae_acts_post(torch.relu(z) * (self._centre(sae_in) @ self.W_enc + self.b_gate > 0))
        return self.hook_sae_acts_post(self.activate(z))

    def activate(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        arch = self.cfg.architecture
        if arch in ("relu", "gated"):
            return torch.relu(z)
        if arch == "topk":
            return _topk(z, self.cfg.k)
        if arch == "batchtopk":
            if self.training:
                return self._batch_topk(torch.relu(z))
            if float(self.batch_threshold) < 0:  # never trained: fall back to per-row top-k
                return _topk(z, self.cfg.k)
            return z * (z > self.batch_threshold.to(z.dtype))
        flat = z.reshape(-1, z.shape[-1])
        return _JumpReLU.apply(flat, self.threshold, self.cfg.jumprelu_bandwidth).reshape(z.shape)

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
        """acts @ W_dec + b_dec (hook_sae_recons), then undo the run-time normalization. A skip
        transcoder's W_skip term is added by `forward` / the splice, as in SAELens."""
        return self._normalize_out(self.hook_sae_recons(acts.to(self.dtype) @ self.W_dec + self.b_dec))

    def skip_term(self, x: Float[Tensor, "... d_in"]) -> Optional[Tensor]:
        return x.to(self.dtype) @ self.W_skip.T if self.cfg.skip else None

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """SAELens's ``SAE.forward``: the reconstruction, plus with ``use_error_term`` the error
        x - recons(x) of the unedited input, computed without hooks and without gradient."""
        out = self.decode(self.encode(x))
        if self.cfg.skip:
            out = out + self.skip_term(x)
        if self.use_error_term:
            if self.cfg.is_transcoder:
                raise UserError("a transcoder's error term needs its target: splice it with HookedViT.add_sae")
            with torch.no_grad():
                with hooks_disabled(self):
                    clean = self.decode(self.encode(x))
                error = self.hook_sae_error(x.to(self.dtype) - clean)
            out = out + error
        return self.hook_sae_output(out)

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


def _topk(z: Tensor, k: int) -> Tensor:
    """relu of the k largest pre-activations per row, zeros elsewhere. The same as top-k of
    relu(z), but relu and its backward touch k values per row, not d_sae, and the zeros are
    written in place (an out-of-place scatter copies the whole [n, d_sae] buffer once more)."""
    values, idx = z.topk(k, dim=-1, sorted=False)
    return z.new_zeros(z.shape).scatter_(-1, idx, values.relu())
