"""Training losses: identity (label-smoothed CE), batch-hard soft-margin triplet, MoE aux. A dict of named parts.

The identity and triplet losses take the whole global micro batch (gathered over the ranks by the loop), in
fp32: batch-hard mining over one rank's slice would be a different, weaker loss that changes with the
number of GPUs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mfrnet_ds.config import LossConfig


def batch_hard_triplet(feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft-margin triplet on the hardest positive and hardest negative of each anchor (Hermans et al.)."""
    dist = torch.cdist(feat.float(), feat.float())                     # (B, B) Euclidean
    same = labels[:, None] == labels[None, :]
    hardest_pos = (dist * same).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    # An anchor with no negative in the batch has no triplet: masked out without a branch (an `if` on a device
    # value would be a host sync in every step); no anchor with one gives 0.
    valid = torch.isfinite(hardest_neg)
    margin = hardest_pos - torch.where(valid, hardest_neg, hardest_pos)
    return (F.softplus(margin) * valid).sum() / valid.sum().clamp(min=1)


def compute_losses(logits: list[torch.Tensor], features: list[torch.Tensor], labels: torch.Tensor,
                   aux_loss: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Sum over the model's features (one for the concat head, three for the per-modality head);
    `logits`, `features` and `labels` cover the same samples."""
    loss_id = sum(F.cross_entropy(lg.float(), labels, label_smoothing=cfg.label_smoothing) for lg in logits)
    loss_tri = sum(batch_hard_triplet(f, labels) for f in features)
    parts = {"loss_id": cfg.id_weight * loss_id, "loss_tri": cfg.triplet_weight * loss_tri,
             "loss_aux": aux_loss.float()}
    parts["loss"] = parts["loss_id"] + parts["loss_tri"] + parts["loss_aux"]
    return parts
