"""What every raw-tree reader returns: records, the problems it found, and the layout facts.

A reader only looks at names and folders; it never decodes images (the builder does, in parallel).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "query", "gallery")


class LayoutError(ValueError):
    """The root folder is not the expected raw layout (one message listing what was expected)."""


@dataclass(frozen=True)
class Record:
    """One triplet as found on disk.

    `files` holds paths relative to the raw root: three (rgb, nir, tir) where each modality is its own
    file, or one where the three modalities sit side by side in a single image (RGBNT100).
    """

    key: str
    source: str
    files: tuple[str, ...]
    pid: int
    camid: int
    sceneid: int = -1
    label: int = -1


@dataclass(frozen=True)
class Problem:
    """An input left out of the dataset, with the reason (reported and stored in the manifest)."""

    source: str
    reason: str


@dataclass(frozen=True)
class Protocol:
    """What the builder, trainer and evaluator must know about a dataset beyond its records: declared once by
    its reader (`PROTOCOL`) and written into manifest.json, so nothing downstream tests a dataset's name."""

    image_size: tuple[int, int]      # (H, W) of one modality, the native size the model is configured for
    max_cameras: int                 # camera ids 0..max_cameras-1 fit the naming rule
    max_id: int                      # the largest identity id the naming rule holds
    side_by_side: bool = False       # one file holds all modalities left to right (the builder cuts it)
    # which id, besides the identity, takes a gallery entry out of a query's ranking: "camids" (same camera,
    # Market-1501 style) or "sceneids" (same scene, MSVR310)
    match_by: str = "camids"
    evaluates_missing: bool = False  # its published protocol reports the missing-modality settings too


@dataclass
class RawDataset:
    """A raw tree read into records.

    `groups` are the sets that become shards; `splits` maps each of train/query/gallery to a group
    (RGBNT201's query and gallery are both the one test group).
    """

    name: str
    root: Path
    protocol: Protocol
    groups: dict[str, list[Record]]
    splits: dict[str, str]
    problems: list[Problem] = field(default_factory=list)
    junk: int = 0

    @property
    def image_size(self) -> tuple[int, int]:
        return self.protocol.image_size

    def records(self, split: str) -> list[Record]:
        return self.groups[self.splits[split]]


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def make_key(source: str) -> str:
    """A WebDataset key from a relative path: no dots (WebDataset splits member names at the first
    dot) and no slashes, so every tool sees the same key."""
    stem = source.rsplit(".", 1)[0]
    return _KEY_UNSAFE.sub("_", stem)


def require_dirs(root: Path, dataset: str, expected: list[str]) -> None:
    """Raise one LayoutError naming every expected folder when any is missing."""
    root = Path(root)
    missing = [d for d in expected if not (root / d).is_dir()]
    if missing:
        listing = ", ".join(f"{d}/" for d in expected)
        raise LayoutError(
            f"{root} is not a {dataset} tree: expected the folders {listing} under it; "
            f"missing: {', '.join(f'{d}/' for d in missing)}"
        )


def list_images(folder: Path) -> list[Path]:
    """The .jpg files of a folder, sorted, so that every reader sees one order on every machine."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".jpg")


def by_split(name: str, root: Path, protocol: Protocol, splits: dict[str, list[Record]], problems: list[Problem],
             junk: int = 0) -> RawDataset:
    """A dataset whose folders are its train/query/gallery splits; training labels made contiguous."""
    groups = {split: relabel(records) if split == "train" else records for split, records in splits.items()}
    return RawDataset(name=name, root=root, protocol=protocol, groups=groups, splits={s: s for s in groups},
                      problems=problems, junk=junk)


def relabel(records: list[Record]) -> list[Record]:
    """Contiguous training labels 0..N-1 in ascending original-id order."""
    pids = sorted({r.pid for r in records})
    to_label = {pid: i for i, pid in enumerate(pids)}
    return [
        Record(r.key, r.source, r.files, r.pid, r.camid, r.sceneid, to_label[r.pid]) for r in records
    ]
