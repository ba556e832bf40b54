"""MegaLoc (Berton & Masone, CVPRW 2025): DINOv2 ViT-B/14 + SALAD + linear projection.

Descriptor: SALAD's 16640-D vector (256-D token + 64 clusters x 256) -> Linear -> 8448-D -> L2.
Inputs whose sides are not multiples of 14 are resized (bilinear, antialiased) to the nearest
multiple, as the official model does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megaloc_ros.encoding.model.salad import SALAD
from megaloc_ros.encoding.model.vit import VIT_B14, ViT, ViTConfig


@dataclass(frozen=True)
class MegaLocConfig:
    vit: ViTConfig = field(default_factory=lambda: VIT_B14)
    num_clusters: int = 64
    cluster_dim: int = 256
    token_dim: int = 256
    mlp_dim: int = 512
    feat_dim: int = 8448
    sinkhorn_iters: int = 3


def resize_to_patch_multiple(images: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Resize [B, 3, H, W] so both sides are the nearest multiple of ``patch`` (Python round)."""
    h, w = images.shape[-2:]
    if h % patch == 0 and w % patch == 0:
        return images
    size = (round(h / patch) * patch, round(w / patch) * patch)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


class Aggregator(nn.Module):
    def __init__(self, cfg: MegaLocConfig):
        super().__init__()
        self.agg = SALAD(cfg.vit.embed_dim, cfg.num_clusters, cfg.cluster_dim, cfg.token_dim,
                         cfg.mlp_dim, cfg.sinkhorn_iters)
        self.linear = nn.Linear(self.agg.out_dim, cfg.feat_dim)

    def forward(self, patches: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        return self.linear(self.agg(patches, cls_token))


class MegaLoc(nn.Module):
    """``forward(images [B,3,H,W], ImageNet-normalised) -> descriptors [B, feat_dim]``."""

    def __init__(self, cfg: MegaLocConfig = MegaLocConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = ViT(cfg.vit)
        self.aggregator = Aggregator(cfg)

    @property
    def descriptor_dim(self) -> int:
        return self.cfg.feat_dim

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(descriptor [B, D], backbone patch tokens [B, h, w, C])."""
        images = resize_to_patch_multiple(images, self.cfg.vit.patch_size)
        patches, cls_token = self.backbone.features(images)
        return F.normalize(self.aggregator(patches, cls_token), p=2, dim=-1), patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[0]
