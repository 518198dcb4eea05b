"""MSVR310 (Zheng et al., 2022): 310 vehicles, 2,087 triplets, RGB + NIR + TIR, 128x256.

    MSVR310/bounding_box_train/<vid>/{vis,ni,th}/<name>.jpg   train (155 ids)
    MSVR310/query3/<vid>/{vis,ni,th}/<name>.jpg               query (591)
    MSVR310/bounding_box_test/<vid>/{vis,ni,th}/<name>.jpg    gallery (1,055)

Parse, as the reference: characters 0-3 of the name = vehicle id, 6-8 = scene id, 11 = camera 0..7
(already 0-based). A sample is the vis file plus the ni and th files of the same name. Evaluation
drops gallery entries with the query's id AND scene, hence the scene id in every record.
"""
from __future__ import annotations

from pathlib import Path

from mfrnet_ds.raw.record import (Problem, Protocol, RawDataset, Record, by_split, list_images, make_key,
                                  require_dirs)

NAME = "msvr310"
IMAGE_SIZE = (128, 256)
PROTOCOL = Protocol(image_size=IMAGE_SIZE, max_cameras=8, max_id=9_999, match_by="sceneids")
FOLDERS = {"train": "bounding_box_train", "query": "query3", "gallery": "bounding_box_test"}
MODALITY_DIRS = ("vis", "ni", "th")


def parse_name(name: str) -> tuple[int, int, int]:
    """(vehicle id, scene id, camera) from a name like '0012_s003_v5_001.jpg'; ValueError if not."""
    try:
        pid, sceneid, camid = int(name[0:4]), int(name[6:9]), int(name[11])
    except (ValueError, IndexError):
        raise ValueError(
            f"name {name!r}: expected vehicle id in characters 0-3, scene id in 6-8, camera in 11 "
            "(e.g. '0012_s003_v5_001.jpg')"
        ) from None
    if not 0 <= camid <= 7:
        raise ValueError(f"name {name!r}: camera {camid} outside 0..7")
    if pid < 0 or sceneid < 0:
        raise ValueError(f"name {name!r}: negative vehicle id or scene id")
    return pid, sceneid, camid


def _read_split(root: Path, folder: str, problems: list[Problem]) -> list[Record]:
    records = []
    for vid_dir in sorted(p for p in (root / folder).iterdir() if p.is_dir()):
        rel = f"{folder}/{vid_dir.name}"
        if not (vid_dir / "vis").is_dir():
            problems.append(Problem(rel, f"expected {rel}/vis/, {rel}/ni/, {rel}/th/"))
            continue
        names = {m: {p.name for p in list_images(vid_dir / m)} if (vid_dir / m).is_dir() else set()
                 for m in MODALITY_DIRS}
        for name in sorted(names["vis"]):
            source = f"{rel}/vis/{name}"
            missing = [f"{rel}/{m}/{name}" for m in MODALITY_DIRS[1:] if name not in names[m]]
            if missing:
                problems.append(Problem(source, "missing modality file: " + ", ".join(missing)))
                continue
            try:
                pid, sceneid, camid = parse_name(name)
                if not vid_dir.name.isdigit() or int(vid_dir.name) != pid:
                    raise ValueError(f"name {name!r}: vehicle id {pid} differs from its folder {vid_dir.name!r}")
            except ValueError as exn:
                problems.append(Problem(source, str(exn)))
                continue
            files = tuple(f"{rel}/{m}/{name}" for m in MODALITY_DIRS)
            records.append(Record(make_key(source), source, files, pid, camid, sceneid))
        for m in MODALITY_DIRS[1:]:
            for name in sorted(names[m] - names["vis"]):
                problems.append(Problem(f"{rel}/{m}/{name}", f"missing modality file: {rel}/vis/{name}"))
    return records


def read(root: Path) -> RawDataset:
    root = Path(root)
    require_dirs(root, NAME, list(FOLDERS.values()))
    problems: list[Problem] = []
    splits = {split: _read_split(root, folder, problems) for split, folder in FOLDERS.items()}
    return by_split(NAME, root, PROTOCOL, splits, problems)
