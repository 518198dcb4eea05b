"""Reading a shard folder: the manifest, the samples of one shard, and image decoding.

Damage is expected on a cluster (a shard cut short by a failed copy, a corrupt member): it is
warned about with the shard name, counted in `Damage`, and the sample is left out; reading goes on.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_image

from mfrnet_ds.config import UserError
from mfrnet_ds.shards import FORMAT

log = logging.getLogger("mfrnet_ds.stream")
MODALITIES = ("rgb", "nir", "tir")
_REQUIRED = ("format", "dataset", "modalities", "image_size", "num_cameras", "num_classes", "splits")
_SPLITS = ("train", "query", "gallery")


class ManifestError(UserError, ValueError):
    """DIR/manifest.json is missing or not what the builder writes."""


def read_manifest(shards_dir) -> dict:
    """The parsed DIR/manifest.json; ManifestError naming the file and the key when it is not valid."""
    path = Path(shards_dir) / "manifest.json"
    if not Path(shards_dir).is_dir():
        raise ManifestError(f"shard folder {str(shards_dir) or '(none given)'} does not exist; build the shards "
                            "first (python shards/build.py ...) or point data.shards at them")
    if not path.is_file():
        raise ManifestError(f"{path}: not found; build the shards first (python shards/build.py ...); "
                            "a folder without it is not a finished build")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise ManifestError(f"{path}: not valid JSON: {exn}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing key(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ManifestError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    for split in _SPLITS:
        entry = manifest["splits"].get(split)
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or "num_samples" not in entry:
            raise ManifestError(f"{path}: splits.{split} must hold 'shards' (a list) and 'num_samples'")
        for shard in entry["shards"]:
            if not isinstance(shard, dict) or not {"name", "num_samples"} <= shard.keys():
                raise ManifestError(f"{path}: splits.{split}.shards entries need 'name' and 'num_samples': {shard!r}")
    return manifest


@dataclass
class Damage:
    """What a reader left out; per process (each DataLoader worker has its own)."""

    count: int = 0
    events: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.count += 1
        if len(self.events) < 100:
            self.events.append(message)
        log.warning("%s (%d damaged so far in this reader)", message, self.count)


@dataclass(frozen=True)
class RawSample:
    """A sample as stored: key, metadata, and the three encoded images in modality order."""

    key: str
    shard: str
    meta: dict
    images: tuple[bytes, bytes, bytes]


def iter_shard(path: Path, damage: Damage, *, with_damaged: bool = False) -> Iterator[RawSample | None]:
    """Complete samples of one shard, in stored order; damage is noted and skipped, never raised.

    with_damaged=True yields None in place of an incomplete sample, so that positions stay counted.
    """
    name = Path(path).name

    def handler(exn: Exception) -> bool:
        damage.note(f"shard {name}: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    for sample in wds.tarfile_samples([{"url": str(path)}], handler=handler):
        key = sample.get("__key__", "?")
        found = {}
        for member, data in sample.items():
            base = member.split(".")[0]
            if base in MODALITIES:
                found[base] = data
        missing = [m for m in MODALITIES if m not in found] + ([] if "json" in sample else ["json"])
        if missing:
            damage.note(f"shard {name}: incomplete sample {key}: missing {', '.join(missing)}")
            if with_damaged:
                yield None
            continue
        try:
            meta = json.loads(sample["json"])
        except ValueError as exn:
            damage.note(f"shard {name}: sample {key}: bad json member: {exn}")
            if with_damaged:
                yield None
            continue
        yield RawSample(key, name, meta, tuple(found[m] for m in MODALITIES))


def decode(sample: RawSample) -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB tensors of the three images; ValueError naming the member if one is bad."""
    images = []
    for modality, data in zip(MODALITIES, sample.images):
        try:
            images.append(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
        except RuntimeError as exn:
            raise ValueError(f"shard {sample.shard}: sample {sample.key}: {modality} does not decode: {exn}") from None
    return images
