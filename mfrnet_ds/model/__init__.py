"""The MFRNet model: `build_model(config)`."""
from __future__ import annotations

import torch

from mfrnet_ds.config import Config
from mfrnet_ds.model.backbone import load_pretrained
from mfrnet_ds.model.mfrnet import MISSING_SETTINGS, MFRNet, MFRNetOutput


def build_model(config: Config) -> MFRNet:
    """Build MFRNet deterministically from `config` (same config -> same weights).

    Under expert parallelism each MoE layer holds num_experts / ep_size experts; the model knows no ranks,
    so they start as the first slice (expert-parallel rank 0, every expert when ep_size is 1), and
    `engine.dist.place_experts` gives a process the slice its rank holds.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        model = MFRNet(config.model)
    for layer in model.moe_layers:
        layer.init_experts(config.train.seed)
    if config.model.pretrained not in ("", "none"):
        load_pretrained(model.vit, config.model.pretrained, activation=config.model.activation)
    return model


__all__ = ["build_model", "MFRNet", "MFRNetOutput", "MISSING_SETTINGS"]
