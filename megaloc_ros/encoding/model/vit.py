"""DINOv2 Vision Transformer (ViT-S/14 and ViT-B/14 share this one implementation).

Parameter names follow the official MegaLoc checkpoint (``backbone.*`` there), so a MegaLoc
``model.safetensors`` loads strictly without renaming. Semantics follow DINOv2: a class token,
learned position embeddings trained on a 37x37 grid (518 px) and interpolated bicubically with
DINOv2's historical 0.1 offset, pre-norm blocks with LayerScale, no register tokens, and a final
LayerNorm applied to every token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    pos_grid: int = 37          # side of the trained position-embedding grid (518 / 14)
    norm_eps: float = 1e-6
    interpolate_offset: float = 0.1  # DINOv2's; 0 = interpolate to the output size (Hugging Face)

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


VIT_B14 = ViTConfig()
VIT_S14 = ViTConfig(embed_dim=384, depth=12, num_heads=6)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, N, C]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        head = c // self.num_heads
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, head).permute(2, 0, 3, 1, 4).unbind(0)
        # Explicit matmul-softmax-matmul (not SDPA) keeps the ONNX graph as plain MatMuls, which
        # dynamic int8 quantisation and every execution provider handle.
        weights = torch.softmax((q @ k.transpose(-2, -1)) * head ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.mlp_dim)
        self.ls2 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """DINOv2 ViT. ``forward`` returns all tokens after the final norm: [B, 1 + h*w, C]."""

    def __init__(self, cfg: ViTConfig = VIT_B14):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid ** 2 + 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a rows x cols patch grid: [1, 1 + rows*cols, C]."""
        g = self.cfg.pos_grid
        if rows == g and cols == g:
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        off = self.cfg.interpolate_offset
        if off:
            # DINOv2 (and MegaLoc) pass a scale factor with a +0.1 offset, not an output size; the
            # offset also shifts the bicubic sampling positions, so it is kept for exactness.
            grid = F.interpolate(grid, scale_factor=((rows + off) / g, (cols + off) / g),
                                 mode="bicubic", align_corners=False)
        else:  # Hugging Face Dinov2Model interpolates to the output size
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (rows, cols):
            raise ValueError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, "
                             f"expected {(rows, cols)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls_pos, grid.to(self.pos_embed.dtype)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"ViT input {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(h // p, w // p)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens [B, h, w, C], class token [B, C]), both after the final norm."""
        b, _, h, w = images.shape
        tokens = self.forward(images)
        p = self.patch_size
        return tokens[:, 1:].reshape(b, h // p, w // p, -1), tokens[:, 0]


def config_from_shapes(embed_dim: int, depth: int, num_pos: int, patch_size: int = 14,
                       mlp_dim: int | None = None, interpolate_offset: float = 0.1) -> ViTConfig:
    """DINOv2 sizes from checkpoint shapes (DINOv2 uses 64-D heads)."""
    grid = int(round(math.sqrt(num_pos - 1)))
    if grid * grid != num_pos - 1:
        raise ValueError(f"{num_pos - 1} position embeddings do not form a square grid")
    ratio = (mlp_dim / embed_dim) if mlp_dim else 4.0
    return ViTConfig(embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // 64),
                     mlp_ratio=ratio, patch_size=patch_size, pos_grid=grid,
                     interpolate_offset=interpolate_offset)
