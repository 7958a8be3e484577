"""CUDA checks (skipped without a GPU): equivalence with timm and low-precision runs."""

from __future__ import annotations

import pytest
import torch

from helpers import images, make_timm
from hooked_vit import HookedViT

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_rpn_224",
                                  "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
                                  "vit_base_patch16_clip_224"])
def test_cuda_fp32_matches_timm_on_both_attention_paths(name):
    timm_model, size = make_timm(name)
    timm_model = timm_model.cuda()
    model = HookedViT.from_timm(timm_model)
    x = images(size).cuda()
    with torch.no_grad():
        ref = timm_model(x)
        fused = model(x)
        explicit = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: a)])
    for out in (fused, explicit):
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4  # TF32 may be on


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_runs_and_caches(dtype):
    timm_model, size = make_timm("vit_tiny_patch16_224")
    ref = timm_model(images(size))
    model = HookedViT.from_timm(timm_model, device="cuda", dtype=dtype)
    logits, cache = model.run_with_cache(images(size).cuda().to(dtype))
    assert cache["blocks.1.attn.hook_pattern"].dtype == dtype
    assert float((logits.float().cpu() - ref).abs().max() / ref.abs().max()) < 0.05
