"""Backbone presets: CLIP-style ViT towers with patch 16, stride 16. One function each, in a registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Preset:
    width: int
    depth: int
    heads: int
    proj_dim: int     # CLIP projection (the per-modality feature size)


PRESETS: dict[str, Preset] = {}


def register(fn: Callable[[], Preset]) -> Callable[[], Preset]:
    PRESETS[fn.__name__] = fn()
    return fn


@register
def tiny() -> Preset:
    """For tests and the CPU demo: seconds per step on a laptop."""
    return Preset(width=64, depth=4, heads=4, proj_dim=32)


@register
def small() -> Preset:
    return Preset(width=384, depth=12, heads=6, proj_dim=256)


@register
def base() -> Preset:
    """The paper's CLIP ViT-B/16 visual tower."""
    return Preset(width=768, depth=12, heads=12, proj_dim=512)


@register
def large() -> Preset:
    """CLIP ViT-L width and depth, kept at patch 16 so the token grid matches the other presets."""
    return Preset(width=1024, depth=24, heads=16, proj_dim=768)
