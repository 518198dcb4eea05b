"""RGBNT201 (Zheng et al., AAAI 2021): 201 persons, 4 cameras, RGB + NIR + TIR, 256x128.

    RGBNT201/train_171/{RGB,NI,TI}/<name>.jpg   train (171 ids)
    RGBNT201/test/{RGB,NI,TI}/<name>.jpg        query and gallery: the same 30-id test set

Parse, as the reference loader: person id = int(first 6 characters of the first `_` field),
camera = int(4th character of the second field) - 1 (`cam3` -> 2). A sample is the RGB file plus the
NI and TI files of the same name.
"""
from __future__ import annotations

from pathlib import Path

from mfrnet_ds.raw.record import Problem, Protocol, RawDataset, Record, list_images, make_key, relabel, require_dirs

NAME = "rgbnt201"
IMAGE_SIZE = (256, 128)
PROTOCOL = Protocol(image_size=IMAGE_SIZE, max_cameras=9, max_id=999_999, evaluates_missing=True)
FOLDERS = {"train": "train_171", "test": "test"}
MODALITY_DIRS = ("RGB", "NI", "TI")


def parse_name(name: str) -> tuple[int, int]:
    """(pid, 0-based camera) from a file name; ValueError saying what did not parse."""
    fields = name.split("_")
    if len(fields) < 2:
        raise ValueError(f"name {name!r} has no '_<cam>' field (expected '<pid>_cam<N>_...jpg')")
    try:
        pid = int(fields[0][0:6])
        camid = int(fields[1][3]) - 1
    except (ValueError, IndexError):
        raise ValueError(
            f"name {name!r}: expected '<6-digit pid>_cam<digit>_...jpg' "
            f"(pid from the first 6 characters, camera from the 4th character of the second field)"
        ) from None
    if pid < 0 or camid < 0:
        raise ValueError(f"name {name!r}: pid {pid} and camera {camid + 1} must be >= 0 and >= 1")
    return pid, camid


def _read_folder(root: Path, folder: str, problems: list[Problem]) -> list[Record]:
    base = root / folder
    rgb_names = {p.name for p in list_images(base / "RGB")}
    other_names = {n: {p.name for p in list_images(base / n)} for n in MODALITY_DIRS[1:]}
    records = []
    for name in sorted(rgb_names):
        source = f"{folder}/RGB/{name}"
        missing = [m for m in MODALITY_DIRS[1:] if name not in other_names[m]]
        if missing:
            paths = ", ".join(f"{folder}/{m}/{name}" for m in missing)
            problems.append(Problem(source, f"missing modality file: {paths}"))
            continue
        try:
            pid, camid = parse_name(name)
        except ValueError as exn:
            problems.append(Problem(source, str(exn)))
            continue
        files = tuple(f"{folder}/{m}/{name}" for m in MODALITY_DIRS)
        records.append(Record(make_key(source), source, files, pid, camid))
    for m, names in other_names.items():
        for name in sorted(names - rgb_names):
            problems.append(Problem(f"{folder}/{m}/{name}", f"missing modality file: {folder}/RGB/{name}"))
    return records


def read(root: Path) -> RawDataset:
    root = Path(root)
    require_dirs(root, NAME, [f"{f}/{m}" for f in FOLDERS.values() for m in MODALITY_DIRS])
    problems: list[Problem] = []
    train = relabel(_read_folder(root, FOLDERS["train"], problems))
    test = _read_folder(root, FOLDERS["test"], problems)
    return RawDataset(
        name=NAME,
        root=root,
        protocol=PROTOCOL,
        groups={"train": train, "query": test},
        splits={"train": "train", "query": "query", "gallery": "query"},
        problems=problems,
    )
