"""A training-free global descriptor on a plain DINOv2 backbone (used when no MegaLoc is found).

pooling="cls" (default): descriptor = L2(class token after the final norm), C-D (384 for ViT-S/14).
pooling="cls+gem": L2([L2(class token), L2(GeM_3(patch tokens clamped >= eps))]), 2C-D.
Chosen by measurement with the offline ViT-S/14 at 224x224 (recall@1 on the shipped sets,
rtabmap with a +-5 frame exclusion / corridor query->reference): cls 0.845 / 0.387,
cls+gem 0.810 / 0.369, GeM alone 0.774 / 0.342, mean 0.786 / 0.333; 322x322 was not better.
It is a reasonable retrieval baseline, not MegaLoc: maps built with it carry their own model name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaloc_ros.encoding.model.megaloc import resize_to_patch_multiple
from megaloc_ros.encoding.model.vit import ViT

POOLINGS = ("cls", "cls+gem")


class BackboneDescriptor(nn.Module):
    def __init__(self, backbone: ViT, pooling: str = "cls", gem_p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        self.backbone = backbone
        self.pooling, self.gem_p, self.eps = pooling, gem_p, eps

    @property
    def descriptor_dim(self) -> int:
        return self.backbone.embed_dim * (1 if self.pooling == "cls" else 2)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(descriptor [B, D], patch tokens [B, h, w, C])."""
        images = resize_to_patch_multiple(images, self.backbone.patch_size)
        patches, cls_token = self.backbone.features(images)
        desc = F.normalize(cls_token, dim=-1)
        if self.pooling == "cls+gem":
            gem = patches.flatten(1, 2).clamp(min=self.eps).pow(self.gem_p).mean(dim=1).pow(1.0 / self.gem_p)
            desc = F.normalize(torch.cat([desc, F.normalize(gem, dim=-1)], dim=-1), dim=-1)
        return desc, patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[0]
