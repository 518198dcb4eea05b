"""Raw-pixel matching: the trivial baseline a trained model must beat, on the same splits and protocol.

Each sample becomes one vector, its three modalities resized (as evaluation resizes them) to 1/8 of the model's
input size and flattened (3 x 3 x 32 x 16 = 4,608 values at 256x128), L2-normalised and scored exactly like a
model embedding. Computed once per shard set and size and cached in the shard folder
(`pixel_baseline_<H>x<W>.json`; where that folder is read-only or remote it is recomputed per run). Damaged samples are
left out as in the model's evaluation (eval/embed.py); a baseline computed on damaged shards is not written
to the cache (once the shards are repaired it is computed on all samples), only kept for this process.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mfrnet_ds.eval.embed import extract, same_shards, score
from mfrnet_ds.shards import manifest_protocol
from mfrnet_ds.stream.source import ShardSource

log = logging.getLogger("mfrnet_ds.eval")
_COMPUTED: dict[tuple[str, tuple[int, int]], dict[str, float]] = {}


class PixelEmbedding(nn.Module):
    """A "model" whose embedding is the sample's images, flattened and L2-normalised: scored by the same
    extraction and protocol as MFRNet."""

    def forward(self, images: torch.Tensor, camids: torch.Tensor, missing: str = "") -> SimpleNamespace:
        return SimpleNamespace(embedding=F.normalize(images.flatten(1), dim=1))


def pixel_size(img_size) -> tuple[int, int]:
    return max(1, int(img_size[0]) // 8), max(1, int(img_size[1]) // 8)


def pixel_baseline(shards: str | Path, manifest: dict, img_size, *, batch_size: int = 64,
                   num_workers: int = 1) -> dict[str, float]:
    """mAP / R1 / R5 / R10 (percent) of raw-pixel matching; one process, no model."""
    size = pixel_size(img_size)
    where = ShardSource(shards)
    name = f"pixel_baseline_{size[0]}x{size[1]}.json"
    try:   # a remote shard set is read for a cache too (it is never written there)
        return json.loads(where.read_bytes(name))
    except (OSError, ValueError):
        pass
    cache = where.local_dir / name if where.local_dir is not None else None
    key = (str(cache.parent.resolve()) if cache is not None else where.spec, size)
    if key in _COMPUTED:          # a read-only shard folder: computed once per process, not per evaluation
        return _COMPUTED[key]
    kw = dict(img_size=size, batch_size=batch_size, rank=0, world_size=1, device=torch.device("cpu"),
              num_workers=num_workers)
    query = extract(PixelEmbedding(), shards, "query", **kw)
    gallery = query if same_shards(manifest) else extract(PixelEmbedding(), shards, "gallery", **kw)
    result = score(query, gallery, manifest_protocol(manifest).match_by)
    _COMPUTED[key] = result
    damaged = len(query["damaged"]) + (0 if gallery is query else len(gallery["damaged"]))
    if damaged or cache is None:
        if damaged:
            log.info("pixel baseline computed without %d damaged sample(s): not cached in %s", damaged, shards)
        return result
    try:
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(cache)
    except OSError as e:
        log.info("pixel baseline not cached (%s): it is recomputed next time", e)
    return result
