"""Reading a shard set: the manifest, the samples of one shard, and image decoding.

The set is a local folder, an http(s):// URL or a `pipe:` command (stream/source.py); all three are read
the same way. Damage is expected on a cluster (a shard cut short by a failed copy, a corrupt member, a
server that drops the connection): it is warned about with the shard name, counted in `Damage`, and the
sample is left out; reading goes on. A remote shard whose transfer fails is read again (source.RETRIES
times) from where it stopped before anything is called damaged.
"""
from __future__ import annotations

import json
import logging
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from mfrnet_ds.config import MODALITIES, UserError
from mfrnet_ds.shards import FORMAT
from mfrnet_ds.stream import source as src
from mfrnet_ds.stream.source import ShardSource

log = logging.getLogger("mfrnet_ds.stream")
_REQUIRED = ("format", "dataset", "modalities", "image_size", "num_cameras", "num_classes", "splits")
_SPLITS = ("train", "query", "gallery")


class ManifestError(UserError, ValueError):
    """DIR/manifest.json is missing or not what the builder writes."""


def read_manifest(shards_dir) -> dict:
    """The parsed manifest.json of a shard folder, URL or pipe: command; ManifestError naming the file and
    the key when it is not valid."""
    try:
        where = ShardSource(shards_dir)
    except ValueError as exn:
        raise ManifestError(str(exn)) from None
    path = where.where("manifest.json")
    if not where.is_remote and not where.local_dir.is_dir():
        raise ManifestError(f"shard folder {where.spec or '(none given)'} does not exist; build the shards "
                            "first (python shards/build.py ...) or point data.shards at them")
    try:
        text = where.read_bytes("manifest.json")
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; build the shards first (python shards/build.py ...); "
                            "a folder without it is not a finished build") from None
    except OSError as exn:
        raise ManifestError(f"{path}: cannot be read: {str(exn).removeprefix(path + ': ')}") from None
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
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

    def note(self, message: str, samples: int = 1) -> None:
        """`samples` damaged samples (0: an event that costs none by itself, e.g. a transfer given up on,
        whose missing samples are counted by whoever knows how many were due)."""
        self.count += samples
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


def iter_shard(shards, name: str, damage: Damage, *, with_damaged: bool = False,
               expected: int | None = None) -> Iterator[RawSample | None]:
    """Complete samples of shard `name` of the set `shards` (a folder, URL or pipe:, see source.py), in
    stored order; damage is noted and skipped, never raised.

    with_damaged=True yields None in place of an incomplete sample, so that positions stay counted.
    `expected` (the manifest's count) makes a shard that ends early without an error damage too.
    """
    where = shards if isinstance(shards, ShardSource) else ShardSource(shards)
    members = _local_members(where, name, damage) if not where.is_remote else _remote_members(where, name, damage)
    given = 0
    for sample in members:
        given += 1
        checked = _check_sample(name, sample, damage)
        if checked is not None or with_damaged:
            yield checked
    if expected is not None and given < expected:
        damage.note(f"shard {name}: ended after {given} of its {expected} samples", samples=expected - given)


def _check_sample(name: str, sample: dict, damage: Damage) -> RawSample | None:
    key = sample.get("__key__", "?")
    found = {}
    for member, data in sample.items():
        base = member.split(".")[0]
        if base in MODALITIES:
            found[base] = data
    missing = [m for m in MODALITIES if m not in found] + ([] if "json" in sample else ["json"])
    if missing:
        damage.note(f"shard {name}: incomplete sample {key}: missing {', '.join(missing)}")
        return None
    try:
        meta = json.loads(sample["json"])
    except ValueError as exn:
        damage.note(f"shard {name}: sample {key}: bad json member: {exn}")
        return None
    return RawSample(key, name, meta, tuple(found[m] for m in MODALITIES))


def _local_members(where: ShardSource, name: str, damage: Damage) -> Iterator[dict]:
    def handler(exn: Exception) -> bool:
        damage.note(f"shard {name}: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    return wds.tarfile_samples([{"url": where.where(name)}], handler=handler)


def _remote_members(where: ShardSource, name: str, damage: Damage) -> Iterator[dict]:
    """The samples of a remote shard; a failed transfer is retried from the start of the file, skipping the
    samples already given, so a recovered drop gives exactly what an unbroken read gives."""
    given = 0
    for attempt in range(src.RETRIES + 1):
        try:
            with where.open_checked(name) as stream:
                for position, sample in enumerate(_tar_samples(stream)):
                    if position >= given:
                        given += 1
                        yield sample
            return
        except FileNotFoundError as exn:
            damage.note(f"shard {name}: {exn}", samples=0)
            return
        except (OSError, tarfile.TarError, ValueError) as exn:
            # webdataset appends " @ <stream>" to what it passes on: the stream is named already
            why = f"{type(exn).__name__}: {str(exn.args[0] if exn.args else exn).split(' @ ')[0]}"
            if attempt == src.RETRIES:
                damage.note(f"shard {name}: gave up after {src.RETRIES} retries, {given} samples read; the rest "
                            f"of the shard is missing ({why})", samples=0)
                return
            wait = src.BACKOFF_S * 2 ** attempt
            log.warning("shard %s: read failed after %d samples (%s); retry %d of %d in %.1f s",
                        name, given, why, attempt + 1, src.RETRIES, wait)
            time.sleep(wait)


def _tar_samples(stream) -> Iterator[dict]:
    """Members of a tar stream grouped by key (as webdataset does); an error is raised, not swallowed, and a
    sample cut by it is not given."""
    current: dict | None = None
    for member in tar_file_iterator(stream):
        key, suffix = base_plus_ext(member["fname"])
        if key is None:
            continue
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        current = current or {"__key__": key}
        current[suffix.lower()] = member["data"]
    if current is not None:
        yield current


def decode(sample: RawSample) -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB tensors of the three images; ValueError naming the member if one is bad."""
    images = []
    for modality, data in zip(MODALITIES, sample.images):
        try:
            images.append(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
        except RuntimeError as exn:
            raise ValueError(f"shard {sample.shard}: sample {sample.key}: {modality} does not decode: {exn}") from None
    return images
