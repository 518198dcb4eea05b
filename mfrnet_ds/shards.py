"""Records -> WebDataset tar shards, a wids index per split, and DIR/manifest.json. No torch here.

Output of `build(dataset, root, out)`:

    DIR/train-000000.tar ...   training samples, whole identities packed together
    DIR/query-000000.tar ...   (RGBNT201: the test set, listed for both query and gallery)
    DIR/gallery-000000.tar ...
    DIR/<split>.wids.json      wids-shard-index-v1 of each split (shard urls relative to DIR)
    DIR/manifest.json          written last: a DIR without it is not a finished build

Sample schema (other tools read it): `__key__` = the source path made safe (letters, digits, `_`,
`-`); members `rgb.<ext>`, `nir.<ext>`, `tir.<ext>`: the original file bytes where a raw file holds
one modality, lossless PNG crops for side-by-side RGBNT100 files; and `json` with `pid` (original
id), `label` (contiguous training label, train only), `camid` (0-based), `sceneid` (MSVR310, else
-1), `source` (path relative to the raw root).

manifest.json keys:
    format            "mfrnet-ds-shards"
    builder_version   int, bumped when the output changes for the same input
    dataset           "rgbnt201" | "rgbnt100" | "msvr310"
    modalities        ["rgb", "nir", "tir"]: member names, in model order
    image_size        [H, W] the model input size of this dataset
    protocol          the reader's Protocol (raw/record.py): max_cameras, max_id, side_by_side, match_by
                      ("camids" | "sceneids": what the gallery filter matches), evaluates_missing; version 1
                      manifests lack it: manifest_protocol() falls back to the reader's
    num_cameras       max camid + 1 over all splits (size of the camera embedding)
    num_scenes        number of distinct scene ids (0 where the dataset has none)
    num_classes       training labels are 0..num_classes-1 (the classifier size); equals
                      splits.train.num_ids unless bad input removed every image of an identity
    splits            {"train"|"query"|"gallery": {
                          "num_samples": int, "num_ids": int, "wids_index": "<split>.wids.json",
                          "shards": [{"name": "train-000000.tar", "num_samples": int, "num_ids": int}]}}
    skipped           [{"source": path relative to the raw root, "reason": str}] inputs left out
    junk_skipped      number of junk-id (-1) images skipped by the dataset's protocol

Determinism: inputs are sorted, the identity order of train is shuffled with a fixed seed, shards are
cut before work is spread over workers, and tar members carry fixed metadata (mtime 0, uid/gid 0), so
the same input gives byte-identical shards with any number of workers. Atomicity: every file is
written under a hidden temporary name in DIR and renamed when complete; the manifest goes last.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mfrnet_ds.raw import MODALITIES, PROTOCOLS, SPLITS, Problem, Protocol, Record, read_raw

FORMAT = "mfrnet-ds-shards"
BUILDER_VERSION = 2
DEFAULT_MAXCOUNT = 256
IDENTITY_ORDER_SEED = 0
_EXT = {"JPEG": "jpg", "PNG": "png"}
_SHARD_NAME = re.compile(r"^(train|query|gallery)-\d{6}\.tar$")
_TMP_MARK = ".tmp-"


class BuildError(RuntimeError):
    """A build that must stop: bad input under --on-error fail, or an inconsistent tree."""


@dataclass(frozen=True)
class _ShardJob:
    root: str
    out: str
    name: str
    records: tuple[Record, ...]
    side_by_side: bool
    with_label: bool
    fail_fast: bool


@dataclass(frozen=True)
class _ShardResult:
    name: str
    num_samples: int
    pids: tuple[int, ...]
    problems: tuple[Problem, ...]
    md5sum: str
    filesize: int


def _decode_check(data: bytes, path: str) -> tuple[str, Image.Image]:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exn:  # PIL raises many types for broken files
        raise ValueError(f"unreadable image {path}: {exn}") from None
    if image.format not in _EXT:
        raise ValueError(f"unsupported image format {image.format} in {path}: expected JPEG or PNG")
    return _EXT[image.format], image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: lossless like any level, several times faster to write, ~20% larger.
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def encode_sample(root: Path, record: Record, side_by_side: bool, with_label: bool) -> dict[str, bytes]:
    """Tar members of one record (name suffix -> bytes); ValueError naming the file on bad input."""
    members: dict[str, bytes] = {}
    if side_by_side:
        path = record.files[0]
        _, image = _decode_check((root / path).read_bytes(), path)
        width, height = image.size
        if width % 3:
            raise ValueError(f"side-by-side image {path} is {width}x{height}: width must be 3 x one modality")
        image = image.convert("RGB")
        step = width // 3
        for i, modality in enumerate(MODALITIES):
            members[f"{modality}.png"] = _png(image.crop((i * step, 0, (i + 1) * step, height)))
    else:
        for modality, path in zip(MODALITIES, record.files):
            try:
                data = (root / path).read_bytes()
            except OSError as exn:
                raise ValueError(f"cannot read {path}: {exn.strerror}") from None
            ext, _ = _decode_check(data, path)
            members[f"{modality}.{ext}"] = data
    meta = {"pid": record.pid, "camid": record.camid, "sceneid": record.sceneid, "source": record.source}
    if with_label:
        meta["label"] = record.label
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _tmp_name(out: Path, name: str) -> Path:
    return out / f".{name}{_TMP_MARK}{os.getpid()}"


def _publish(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def _write_shard(job: _ShardJob) -> _ShardResult:
    root, out = Path(job.root), Path(job.out)
    tmp, problems, pids, count = _tmp_name(out, job.name), [], [], 0
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for record in job.records:
            try:
                members = encode_sample(root, record, job.side_by_side, job.with_label)
            except ValueError as exn:
                problems.append(Problem(record.source, str(exn)))
                if job.fail_fast:
                    break
                continue
            for suffix in sorted(members):  # fixed member order: json first, then modalities
                _add(tar, f"{record.key}.{suffix}", members[suffix])
            pids.append(record.pid)
            count += 1
    if problems and job.fail_fast:
        tmp.unlink()
        return _ShardResult(job.name, 0, (), tuple(problems), "", 0)
    data = tmp.read_bytes()
    _publish(tmp, out / job.name)
    return _ShardResult(job.name, count, tuple(sorted(set(pids))), tuple(problems), hashlib.md5(data).hexdigest(),
                        len(data))


def plan_shards(records: list[Record], maxcount: int, whole_identities: bool) -> list[list[Record]]:
    """Cut records into shards of at most maxcount.

    Train packs whole identities (an identity larger than maxcount is cut), balanced over the fewest
    shards that fit, so that a stream owning a shard sees every image of its identities and no shard
    is a small remainder with few identities.
    """
    if not whole_identities:
        return [records[i:i + maxcount] for i in range(0, len(records), maxcount)]
    by_pid: dict[int, list[Record]] = {}
    for record in records:
        by_pid.setdefault(record.pid, []).append(record)
    order = sorted(by_pid)
    # Fixed shuffle: shards hold a mix of ids instead of neighbouring id ranges.
    random.Random(IDENTITY_ORDER_SEED).shuffle(order)
    pieces = [by_pid[pid][i:i + maxcount] for pid in order for i in range(0, len(by_pid[pid]), maxcount)]
    shards: list[list[Record]] = [[] for _ in range(-(-len(records) // maxcount))]
    for piece in pieces:
        fits = [s for s in shards if len(s) + len(piece) <= maxcount]
        if not fits:
            shards.append([])
            fits = [shards[-1]]
        min(fits, key=len).extend(piece)
    return [s for s in shards if s]


def _write_json(path: Path, obj) -> None:
    tmp = _tmp_name(path.parent, path.name)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    _publish(tmp, path)


def _clean_previous(out: Path) -> None:
    """A rebuild first drops the old manifest, so a half-rebuilt DIR is never read as finished, and
    the temporaries of builds that were killed."""
    (out / "manifest.json").unlink(missing_ok=True)
    for path in out.iterdir():
        if path.name.startswith(".") and _TMP_MARK in path.name:
            path.unlink()


SYNTHETIC_MARKER = "SYNTHETIC.txt"  # written by mfrnet_ds.synth.make_tree at the root of a raw tree


def build(dataset: str, root, out, *, maxcount: int = DEFAULT_MAXCOUNT, workers: int = 1,
          on_error: str = "skip", progress: bool = False, report=None) -> dict:
    """Read the raw tree, write shards, indexes and the manifest; return the manifest.

    `report(problem)` is called for every input left out (the CLI prints them). With
    on_error="fail" the first bad input raises BuildError and no manifest is written.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
    if maxcount < 1:
        raise ValueError(f"maxcount={maxcount}: expected >= 1")
    raw = read_raw(dataset, root)
    report = report or (lambda problem: None)
    for problem in raw.problems:
        report(problem)
    if raw.problems and on_error == "fail":
        first = raw.problems[0]
        raise BuildError(f"{len(raw.problems)} bad input(s); first: {first.source}: {first.reason}")
    keys = [r.key for g in raw.groups.values() for r in g]
    if len(set(keys)) != len(keys):
        raise BuildError(f"{root}: two inputs map to one sample key; rename one of them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_previous(out)

    jobs, group_of = [], {}
    for group, records in raw.groups.items():
        planned = plan_shards(sorted(records, key=lambda r: r.key), maxcount, whole_identities=group == "train")
        for i, shard in enumerate(planned):
            name = f"{group}-{i:06d}.tar"
            group_of[name] = group
            jobs.append(_ShardJob(str(raw.root), str(out), name, tuple(shard), raw.protocol.side_by_side,
                                  group == "train", on_error == "fail"))
    results = _run_jobs(jobs, workers, progress)

    problems = [p for r in results for p in r.problems]
    for problem in problems:
        report(problem)
    if problems and on_error == "fail":
        for r in results:
            (out / r.name).unlink(missing_ok=True)
        raise BuildError(f"{len(problems)} bad input(s); first: {problems[0].source}: {problems[0].reason}")

    manifest = _manifest(raw, results, group_of, raw.problems + problems)
    # made by mfrnet_ds.synth, not photographed: trackers and reports must say so
    manifest["synthetic"] = (Path(root) / SYNTHETIC_MARKER).is_file()
    for split in SPLITS:
        _write_json(out / f"{split}.wids.json", _wids_index(dataset, split, raw.splits[split], results, group_of))
    _write_json(out / "manifest.json", manifest)
    listed = {r.name for r in results}
    for path in out.iterdir():
        if _SHARD_NAME.match(path.name) and path.name not in listed:
            path.unlink()  # shards of an earlier, larger build into the same DIR
    return manifest


def _run_jobs(jobs: list[_ShardJob], workers: int, progress: bool) -> list[_ShardResult]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(j.records) for j in jobs), unit="sample", desc="shards")
    results = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, result in zip(jobs, pool.map(_write_shard, jobs)):
                results.append(result)
                if bar:
                    bar.update(len(job.records))
    else:
        for job in jobs:
            results.append(_write_shard(job))
            if bar:
                bar.update(len(job.records))
    if bar:
        bar.close()
    return results


def _manifest(raw, results: list[_ShardResult], group_of: dict[str, str], problems: list[Problem]) -> dict:
    all_records = [r for g in raw.groups.values() for r in g]
    kept_pids: dict[str, set[int]] = {}
    shards: dict[str, list[dict]] = {}
    for result in results:
        group = group_of[result.name]
        kept_pids.setdefault(group, set()).update(result.pids)
        shards.setdefault(group, []).append(
            {"name": result.name, "num_samples": result.num_samples, "num_ids": len(result.pids)})
    splits = {}
    for split in SPLITS:
        group = raw.splits[split]
        listed = shards.get(group, [])
        splits[split] = {
            "num_samples": sum(s["num_samples"] for s in listed),
            "num_ids": len(kept_pids.get(group, ())),
            "wids_index": f"{split}.wids.json",
            "shards": listed,
        }
    return {
        "format": FORMAT,
        "builder_version": BUILDER_VERSION,
        "dataset": raw.name,
        "modalities": list(MODALITIES),
        "image_size": list(raw.image_size),
        "protocol": {**dataclasses.asdict(raw.protocol), "image_size": list(raw.image_size)},   # JSON: a list
        "num_cameras": max((r.camid for r in all_records), default=-1) + 1,
        "num_scenes": len({r.sceneid for r in all_records if r.sceneid >= 0}),
        "num_classes": max((r.label for r in raw.records("train")), default=-1) + 1,
        "splits": splits,
        "skipped": [{"source": p.source, "reason": p.reason} for p in problems],
        "junk_skipped": raw.junk,
    }


def _wids_index(dataset: str, split: str, group: str, results: list[_ShardResult], group_of: dict[str, str]) -> dict:
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": f"{dataset}-{split}",
        "shardlist": [
            {"url": r.name, "md5sum": r.md5sum, "nsamples": r.num_samples, "filesize": r.filesize}
            for r in results if group_of[r.name] == group
        ],
    }


def manifest_protocol(manifest: dict) -> Protocol:
    """The dataset protocol a shard set was built with (older manifests: its reader's current one)."""
    saved = manifest.get("protocol")
    if saved is None:
        return PROTOCOLS[manifest["dataset"]]
    return Protocol(**{**saved, "image_size": tuple(saved["image_size"])})
