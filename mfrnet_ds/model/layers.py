"""Small blocks of the model: camera embedding, BNNeck, the per-modality token reduction."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from torch import nn


class CameraEmbedding(nn.Module):
    """SIE: a learned vector per camera, times a coefficient, added to the CLS token."""

    def __init__(self, num_cameras: int, dim: int, coef: float = 1.0):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num_cameras, dim))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.coef = coef

    def forward(self, tokens: torch.Tensor, camids: torch.Tensor) -> torch.Tensor:
        # tokens: (N, T, D) with the CLS token first; camids: (N,)
        # checked outside training only: the check reads the ids back from the device (a host sync per
        # forward), and training batches come from shards whose manifest's camera count was checked against
        # model.num_cameras before the first step
        if not self.training and camids.numel() and (camids.min() < 0 or camids.max() >= self.table.shape[0]):
            raise ValueError(f"camera id out of range 0..{self.table.shape[0] - 1}: got "
                             f"{camids.min().item()}..{camids.max().item()} (set model.num_cameras)")
        cls = tokens[:, :1] + self.coef * self.table[camids].unsqueeze(1).to(tokens.dtype)
        return torch.cat([cls, tokens[:, 1:]], dim=1)


class BNNeck(nn.Module):
    """BatchNorm with a frozen zero bias, then a bias-free identity classifier (as in strong ReID baselines)."""

    def __init__(self, dim: int, num_classes: int | None):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (N, D) -> logits (N, classes), computed in fp32 whatever the parameters' storage dtype."""
        if self.classifier is None:
            raise RuntimeError("the model was built without model.num_classes: it has no classifier")
        bn = self.bn
        if bn.training:
            bn.num_batches_tracked.add_(1)
        x = F.batch_norm(feat.float(), bn.running_mean, bn.running_var, bn.weight.float(), bn.bias.float(),
                         bn.training, bn.momentum, bn.eps)
        return F.linear(x, self.classifier.weight.float())


class TokenReduction(nn.Module):
    """Vehicle head: [CLS; mean of patch tokens] -> LayerNorm -> Linear 2P->P -> QuickGELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.fc = nn.Linear(2 * dim, dim)
        self.act = QuickGELU()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, T, P) projected tokens of one modality -> (B, P)
        pooled = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
        return self.act(self.fc(self.norm(pooled)))
