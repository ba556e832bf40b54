"""PyTorch models: the DINOv2 ViT, SALAD, MegaLoc, the offline backbone descriptor, and weight loading."""
from .megaloc import MegaLoc, MegaLocConfig, resize_to_patch_multiple
from .offline import BackboneDescriptor
from .salad import SALAD
from .vit import VIT_B14, VIT_S14, ViT, ViTConfig

__all__ = ["MegaLoc", "MegaLocConfig", "resize_to_patch_multiple", "BackboneDescriptor", "SALAD",
           "VIT_B14", "VIT_S14", "ViT", "ViTConfig"]
