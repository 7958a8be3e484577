"""Small helpers around TransformerLens's `HookPoint`."""

from __future__ import annotations

from transformer_lens.hook_points import HookPoint


def is_hooked(hook_point: HookPoint) -> bool:
    """True if anything (TransformerLens or plain PyTorch) listens on this hook point.

    Used to choose the fast path: a listener may read or edit the activation, so its
    value must exist and its return must flow downstream.
    """
    return bool(hook_point._forward_hooks or hook_point._backward_hooks)
