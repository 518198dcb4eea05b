"""Backbone presets: CLIP-style ViT towers with patch 16, stride 16, by name (`model.preset`). A new one is one
entry here; nothing else names them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    width: int
    depth: int
    heads: int
    proj_dim: int     # CLIP projection (the per-modality feature size)


PRESETS: dict[str, Preset] = {
    # for tests and the CPU demo: seconds per step on a laptop
    "tiny": Preset(width=64, depth=4, heads=4, proj_dim=32),
    "small": Preset(width=384, depth=12, heads=6, proj_dim=256),
    # the paper's CLIP ViT-B/16 visual tower
    "base": Preset(width=768, depth=12, heads=12, proj_dim=512),
    # CLIP ViT-L width and depth, kept at patch 16 so the token grid matches the other presets
    "large": Preset(width=1024, depth=24, heads=16, proj_dim=768),
}
