"""hooked_vit: TransformerLens-style hooked Vision Transformers that reproduce timm exactly."""

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import CheckpointError, UnsupportedModelError, UserError
from hooked_vit.loading import load_checkpoint
from hooked_vit.model import HookedViT

__all__ = ["HookedViT", "HookedViTConfig", "load_checkpoint", "CheckpointError", "UnsupportedModelError", "UserError"]
__version__ = "0.1.0"
