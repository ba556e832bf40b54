"""SALAD aggregation (Izquierdo & Civera, CVPR 2024) as configured in MegaLoc.

Local features are softly assigned to clusters by optimal transport (log-domain Sinkhorn with a
learnable dust bin that absorbs uninformative patches); per-cluster sums are L2-normalised,
joined with a projected global token, and the whole vector is L2-normalised.
Parameter names and shapes follow the official checkpoint (``aggregator.agg.*``); the 1x1
convolutions of the official code are kept as Conv2d parameters but applied as matrix products
on the token list, which is the same arithmetic and exports to plain MatMul.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinkhorn_log_assignment(scores: torch.Tensor, dust_bin: torch.Tensor, iters: int) -> torch.Tensor:
    """Transport plan (as probabilities) of n patches onto m clusters plus a dust bin.

    scores: [B, m, n]. Mass: each of the m clusters receives 1/(n+m), the dust bin (n-m)/(n+m),
    each patch sends 1/(n+m). Returns exp(log plan) * (n+m) for the m real clusters: [B, m, n].
    """
    b, m, n = scores.shape
    if n <= m:
        raise ValueError(f"SALAD needs more patches ({n}) than clusters ({m}); use a larger input")
    s = torch.cat([scores, dust_bin.to(scores.dtype).expand(b, 1, n)], dim=1)  # [B, m+1, n]
    log_total = math.log(n + m)
    log_rows = torch.tensor([-log_total] * m + [math.log(n - m) - log_total], dtype=s.dtype, device=s.device)
    log_cols = torch.full((n,), -log_total, dtype=s.dtype, device=s.device)
    u = torch.zeros(b, m + 1, dtype=s.dtype, device=s.device)
    v = torch.zeros(b, n, dtype=s.dtype, device=s.device)
    for _ in range(iters):
        u = log_rows - torch.logsumexp(s + v[:, None, :], dim=2)
        v = log_cols - torch.logsumexp(s + u[:, :, None], dim=1)
    log_plan = s + u[:, :, None] + v[:, None, :] + log_total
    return torch.exp(log_plan[:, :m, :])


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to tokens [B, N, C_in] -> [B, N, C_out]."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class SALAD(nn.Module):
    def __init__(self, num_channels: int, num_clusters: int = 64, cluster_dim: int = 256,
                 token_dim: int = 256, mlp_dim: int = 512, sinkhorn_iters: int = 3):
        super().__init__()
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim
        self.sinkhorn_iters = sinkhorn_iters
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, token_dim))
        # Index 1 held the training-time dropout; keeping the slot keeps the official key names.
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, mlp_dim, 1), nn.Identity(), nn.ReLU(), nn.Conv2d(mlp_dim, cluster_dim, 1))
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, mlp_dim, 1), nn.Identity(), nn.ReLU(), nn.Conv2d(mlp_dim, num_clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    @property
    def out_dim(self) -> int:
        return self.token_dim + self.num_clusters * self.cluster_dim

    @staticmethod
    def _mlp(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(seq[3], F.relu(_pointwise(seq[0], x)))

    def forward(self, patches: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        """patches [B, h, w, C], cls_token [B, C] -> [B, token_dim + clusters * cluster_dim]."""
        x = patches.flatten(1, 2)                                    # [B, n, C]
        local = self._mlp(self.cluster_features, x).transpose(1, 2)  # [B, l, n]
        scores = self._mlp(self.score, x).transpose(1, 2)            # [B, m, n]
        token = self.token_features(cls_token)                       # [B, token_dim]
        plan = sinkhorn_log_assignment(scores, self.dust_bin, self.sinkhorn_iters)
        clusters = local @ plan.transpose(1, 2)                      # [B, l, m]
        # Normalised over the cluster_dim axis, then flattened cluster_dim-major (official order).
        clusters = F.normalize(clusters, p=2, dim=1).flatten(1)
        return F.normalize(torch.cat([F.normalize(token, p=2, dim=-1), clusters], dim=-1), p=2, dim=-1)
