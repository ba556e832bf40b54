"""PyTorch models: the DINOv2 ViT, SALAD, MegaLoc, the offline backbone descriptor, and weight loading."""
from megaloc_ros.encoding import require_torch

require_torch("the PyTorch models (megaloc_ros.encoding.model)")  # one clear line, before any `import torch`

from megaloc_ros.encoding.model.megaloc import MegaLoc, MegaLocConfig, resize_to_patch_multiple
from megaloc_ros.encoding.model.offline import BackboneDescriptor
from megaloc_ros.encoding.model.salad import SALAD
from megaloc_ros.encoding.model.vit import VIT_B14, VIT_S14, ViT, ViTConfig

__all__ = ["MegaLoc", "MegaLocConfig", "resize_to_patch_multiple", "BackboneDescriptor", "SALAD",
           "VIT_B14", "VIT_S14", "ViT", "ViTConfig"]
