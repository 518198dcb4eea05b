"""The MFRNet model: `build_model(config)`."""
from __future__ import annotations

import torch

from mfrnet_ds.config import Config
from mfrnet_ds.model.backbone import load_pretrained
from mfrnet_ds.model.moe import expert_parallel_rank
from mfrnet_ds.model.mfrnet import MISSING_SETTINGS, MFRNet, MFRNetOutput


def build_model(config: Config, rank: int = 0) -> MFRNet:
    """Build MFRNet deterministically from `config` (same config -> same weights).

    rank: this process's global rank; it decides which slice of each MoE layer's experts this process
    holds under expert parallelism (0 for a single process).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        model = MFRNet(config.model)
    for layer in model.moe_layers:
        layer.init_experts(config.train.seed, expert_parallel_rank(rank, layer.ep_size))
    if config.model.pretrained not in ("", "none"):
        load_pretrained(model.vit, config.model.pretrained, activation=config.model.activation)
    return model


__all__ = ["build_model", "MFRNet", "MFRNetOutput", "MISSING_SETTINGS"]
