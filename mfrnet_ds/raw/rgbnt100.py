"""RGBNT100 (Li et al., AAAI 2020): 100 vehicles, 8 cameras, RGB + NIR + TIR, 128x256.

    RGBNT100/rgbir/bounding_box_train/*.jpg   train (50 ids)
    RGBNT100/rgbir/query/*.jpg                query
    RGBNT100/rgbir/bounding_box_test/*.jpg    gallery

Each file holds the three modalities side by side (768x128: x 0-255 RGB, 256-511 NIR, 512-767 TIR);
the builder cuts it in three. Parse, as the reference (Market-1501 style): `([-\\d]+)_c([-\\d]+)` gives
vehicle id and camera 1..8 (stored 0-based); id -1 is junk and skipped; valid ids are 1..600.
`root` may be the RGBNT100 folder or its rgbir/ subfolder.
"""
from __future__ import annotations

import re
from pathlib import Path

from mfrnet_ds.raw.record import (Problem, Protocol, RawDataset, Record, by_split, list_images, make_key,
                                  require_dirs)

NAME = "rgbnt100"
IMAGE_SIZE = (128, 256)
PROTOCOL = Protocol(image_size=IMAGE_SIZE, max_cameras=8, max_id=600, side_by_side=True)
FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_PATTERN = re.compile(r"([-\d]+)_c([-\d]+)")
JUNK_PID = -1


def parse_name(name: str) -> tuple[int, int]:
    """(pid, 0-based camera); pid is JUNK_PID for junk images. ValueError when it does not parse."""
    match = _PATTERN.search(name)
    if match is None:
        raise ValueError(f"name {name!r} does not match '<vid>_c<cam>' ({_PATTERN.pattern})")
    try:
        pid, cam = int(match.group(1)), int(match.group(2))
    except ValueError:
        raise ValueError(f"name {name!r}: '{match.group(0)}' is not '<int>_c<int>'") from None
    if pid == JUNK_PID:
        return pid, cam - 1
    if not 1 <= pid <= 600:
        raise ValueError(f"name {name!r}: vehicle id {pid} outside 1..600")
    if not 1 <= cam <= 8:
        raise ValueError(f"name {name!r}: camera {cam} outside 1..8")
    return pid, cam - 1


def _base(root: Path) -> tuple[Path, str]:
    """The rgbir/ folder and its path relative to the given root (sources are relative to root)."""
    if (root / "rgbir").is_dir():
        return root / "rgbir", "rgbir/"
    return root, ""


def read(root: Path) -> RawDataset:
    root = Path(root)
    base, prefix = _base(root)
    require_dirs(base, NAME + " (rgbir/)", list(FOLDERS.values()))
    problems: list[Problem] = []
    junk = 0
    splits: dict[str, list[Record]] = {}
    for split, folder in FOLDERS.items():
        records = []
        for path in list_images(base / folder):
            source = f"{prefix}{folder}/{path.name}"
            try:
                pid, camid = parse_name(path.name)
            except ValueError as exn:
                problems.append(Problem(source, str(exn)))
                continue
            if pid == JUNK_PID:
                junk += 1
                continue
            records.append(Record(make_key(source), source, (source,), pid, camid))
        splits[split] = records
    return by_split(NAME, root, PROTOCOL, splits, problems, junk)
