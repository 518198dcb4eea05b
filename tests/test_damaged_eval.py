"""Damaged evaluation data never costs a run: a query shard cut short and a gallery image that does not decode
are left out of the scores (exactly as if the shards had been built without those samples), counted per split,
and only more than data.max_damaged_share of a split damaged fails the evaluation, naming the shards. Real tar
shards from the synthetic trees, damaged on disk; the real model; the training run under the real launcher."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from launcher import ROOT, run_deepspeed, tiny_shards, tiny_train_args
from mfrnet_ds import build_model, load_config
from mfrnet_ds.config import UserError
from mfrnet_ds.eval.embed import DamagedSplitError, evaluate, extract, format_table, same_shards, score
from mfrnet_ds.eval.health import embedding_health
from mfrnet_ds.eval.pixel import pixel_baseline
from mfrnet_ds.shards import build, manifest_protocol
from mfrnet_ds.stream.pipeline import eval_loader, read_manifest
from mfrnet_ds.synth import make_tree

# torchvision 0.29 marks its image decoders deprecated (TorchCodec); they are what the pinned version has.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
VEHICLE_SIZE = (32, 64)
PERSON_SIZE = (64, 32)
BATCH = 5          # several batches per split, the last one padded
GARBAGE = b"\xff\xd8 this is not an image " * 37


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- damage done to real shards ---------------------------------------------------------------------------

def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _key(member: tarfile.TarInfo) -> str:
    return member.name.split(".")[0]


def sample_keys(path: Path) -> list[str]:
    keys = []
    for member, _ in _members(path):
        if _key(member) not in keys:
            keys.append(_key(member))
    return keys


def truncate(path: Path, fraction: float = 0.6) -> list[str]:
    """Cut the shard to `fraction` of its bytes; the keys of the samples that lost a member."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cut = int(path.stat().st_size * fraction)
    lost = []
    for m in members:
        if m.offset_data + m.size > cut and _key(m) not in lost:
            lost.append(_key(m))
    assert 0 < len(lost) < len(sample_keys(path)), "some samples kept, some lost"
    path.write_bytes(path.read_bytes()[:cut])
    return lost


def corrupt(path: Path, ordinal: int, modality: str = "nir") -> str:
    """Rewrite the shard with sample `ordinal`'s `modality` image replaced by garbage bytes (another length):
    the tar stays valid, the image does not decode. The sample's key."""
    members = _members(path)
    key = sample_keys(path)[ordinal]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, data in members:
            if _key(member) == key and member.name.split(".")[1] == modality:
                data = GARBAGE
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return key


def omit(src: Path, dst: Path, keys: set[str]) -> Path:
    """A copy of the clean shards `src` built without the samples `keys`: their shards rewritten without
    them and the manifest's counts adjusted."""
    shutil.copytree(src, dst)
    counts = {}
    for path in sorted(dst.glob("*.tar")):
        members = _members(path)
        kept = [(m, d) for m, d in members if _key(m) not in keys]
        if len(kept) < len(members):
            with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
                for member, data in kept:
                    tar.addfile(member, io.BytesIO(data))
        counts[path.name] = len({_key(m) for m, _ in kept})
    manifest = json.loads((dst / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            shard["num_samples"] = counts[shard["name"]]
        entry["num_samples"] = sum(s["num_samples"] for s in entry["shards"])
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def positions(shards: Path, split: str, keys: set[str]) -> list[int]:
    """Positions in `split` (shard order, then stored order) of the samples `keys`."""
    out, offset = [], 0
    for shard in read_manifest(shards)["splits"][split]["shards"]:
        names = sample_keys(shards / shard["name"])
        out += [offset + i for i, k in enumerate(names) if k in keys]
        offset += shard["num_samples"]
    return out


# ---- data and model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vehicle_shards(tmp_path_factory) -> Path:
    """RGBNT100 layout (distinct query and gallery shards): 8 test ids x 3 cameras x 3 images: query 24
    samples in 3 shards, gallery 48 in 6."""
    root = tmp_path_factory.mktemp("raw100")
    make_tree("rgbnt100", root, ids=16, cams=3, per_cam=3, seed=3)
    out = tmp_path_factory.mktemp("shards100")
    build("rgbnt100", root, out, maxcount=8)
    return out


@pytest.fixture(scope="module")
def person_shards_small(tmp_path_factory) -> Path:
    """The shared tiny shards (launcher.tiny_shards), RGBNT201 layout (query = gallery): 12 test ids x 3 cameras
    x 3 images = 108 samples in 4 shards."""
    return tiny_shards(tmp_path_factory)


def tiny_model(size):
    config = load_config(None, [f"model.img_size=[{size[0]},{size[1]}]", "model.num_classes=4"])
    return build_model(config).eval()


def eval_kw(size) -> dict:
    return dict(img_size=size, batch_size=BATCH, rank=0, world_size=1, device=torch.device("cpu"), num_workers=0)


def damage_vehicles(clean: Path, dst: Path) -> tuple[list[str], str]:
    shutil.copytree(clean, dst)
    cut = truncate(dst / "query-000001.tar", 0.6)
    bad = corrupt(dst / "gallery-000002.tar", 3)
    return cut, bad


# ---- tests --------------------------------------------------------------------------------------------

def test_damaged_samples_are_scored_as_absent_and_counted(vehicle_shards, tmp_path):
    damaged = tmp_path / "damaged"
    cut, bad = damage_vehicles(vehicle_shards, damaged)
    assert 2 <= len(cut) <= 6
    manifest = read_manifest(damaged)
    assert not same_shards(manifest)
    model = tiny_model(VEHICLE_SIZE)
    kw = eval_kw(VEHICLE_SIZE)

    got = evaluate(model, str(damaged), manifest, max_damaged_share=0.25, **kw)
    assert got["damaged_query"] == len(cut) and got["damaged_gallery"] == 1

    # the same evaluation on shards built without those samples: the same numbers
    clean = omit(vehicle_shards, tmp_path / "omitted", set(cut) | {bad})
    want = evaluate(model, str(clean), read_manifest(clean), max_damaged_share=0.0, **kw)
    assert want["damaged_query"] == want["damaged_gallery"] == 0
    assert {k: v for k, v in got.items() if not k.startswith("damaged_")} == \
        pytest.approx({k: v for k, v in want.items() if not k.startswith("damaged_")}, abs=1e-6)

    # per sample: the embeddings of the valid samples are those of the undamaged shards, and only the damaged
    # positions are missing
    for split, lost in (("query", cut), ("gallery", [bad])):
        part = extract(model, str(damaged), split, **kw)
        full = extract(model, str(vehicle_shards), split, **kw)
        expected_lost = positions(vehicle_shards, split, set(lost))
        assert part["damaged"].tolist() == expected_lost
        total = manifest["splits"][split]["num_samples"]
        assert part["index"].tolist() == [p for p in range(total) if p not in expected_lost]
        assert torch.allclose(part["embedding"], full["embedding"][part["index"]], atol=1e-6)
        assert torch.equal(part["pids"], full["pids"][part["index"]])
        assert torch.equal(part["camids"], full["camids"][part["index"]])

    table = format_table({"": got})
    assert f"damaged samples left out: query {len(cut)}, gallery 1" in table

    # the raw-pixel baseline leaves them out too, and is not cached for damaged shards
    assert pixel_baseline(damaged, manifest, VEHICLE_SIZE) == \
        pytest.approx(pixel_baseline(clean, read_manifest(clean), VEHICLE_SIZE), abs=1e-6)
    assert not list(damaged.glob("pixel_baseline_*.json")) and list(clean.glob("pixel_baseline_*.json"))


@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (3, 1)])
def test_damaged_rows_never_reach_the_model_and_every_rank_keeps_its_batches(vehicle_shards, tmp_path,
                                                                            world_size, num_workers):
    damaged = tmp_path / "damaged"
    cut, bad = damage_vehicles(vehicle_shards, damaged)
    for split, lost in (("query", cut), ("gallery", [bad])):
        total = read_manifest(damaged)["splits"][split]["num_samples"]
        seen_damaged, seen_valid, counts = [], [], []
        for rank in range(world_size):
            batches = list(eval_loader(damaged, split, batch_size=BATCH, img_size=VEHICLE_SIZE, rank=rank,
                                       world_size=world_size, num_workers=num_workers))
            counts.append(len(batches))
            for b in batches:
                assert b["images"].shape == (BATCH, 3, 3, *VEHICLE_SIZE)
                assert (b["camids"] >= 0).all(), "every row the model sees has a camera in range"
                assert not (b["valid"] & b["damaged"]).any()
                assert (b["images"][b["damaged"]] == 0).all() and (b["pids"][b["damaged"]] == -1).all()
                seen_damaged += b["index"][b["damaged"]].tolist()
                seen_valid += b["index"][b["valid"]].tolist()
        assert len(set(counts)) == 1
        assert sorted(seen_damaged) == positions(vehicle_shards, split, set(lost))
        assert sorted(seen_valid + seen_damaged) == list(range(total))


def test_more_than_the_allowed_share_fails_naming_split_share_limit_and_shards(vehicle_shards, tmp_path):
    model = tiny_model(VEHICLE_SIZE)
    kw = eval_kw(VEHICLE_SIZE)
    damaged = tmp_path / "damaged"
    cut, _ = damage_vehicles(vehicle_shards, damaged)
    with pytest.raises(DamagedSplitError) as info:
        evaluate(model, str(damaged), read_manifest(damaged), max_damaged_share=0.05, **kw)
    message = str(info.value)
    share = 100 * len(cut) / 24
    assert message.startswith(f"evaluation split query of {damaged}: {len(cut)} of 24 samples ({share:.1f}%) are "
                              "damaged, more than data.max_damaged_share=0.05 (5.0%) allows; damaged samples by "
                              f"shard: query-000001.tar ({len(cut)}).")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)

    # the gallery over the limit, its damage in two shards: both named, with their counts
    gallery = tmp_path / "gallery"
    shutil.copytree(vehicle_shards, gallery)
    for name, ordinal in (("gallery-000001.tar", 0), ("gallery-000004.tar", 2), ("gallery-000004.tar", 5)):
        corrupt(gallery / name, ordinal, modality="rgb")
    with pytest.raises(DamagedSplitError, match=r"evaluation split gallery of .*: 3 of 48 samples \(6\.2%\) are "
                       r"damaged, more than data\.max_damaged_share=0\.05 \(5\.0%\) allows; damaged samples by "
                       r"shard: gallery-000001\.tar \(1\), gallery-000004\.tar \(2\)\."):
        evaluate(model, str(gallery), read_manifest(gallery), max_damaged_share=0.05, **kw)
    # at the limit it is scored; no limit: scored whatever the share
    assert evaluate(model, str(gallery), read_manifest(gallery), max_damaged_share=3 / 48, **kw)["damaged_gallery"] == 3
    assert evaluate(model, str(damaged), read_manifest(damaged), **kw)["damaged_query"] == len(cut)


def test_same_shards_for_query_and_gallery_count_one_split(person_shards_small, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(person_shards_small, damaged)
    manifest = read_manifest(damaged)
    assert same_shards(manifest) and manifest["splits"]["query"]["num_samples"] == 108
    bad = corrupt(damaged / "query-000001.tar", 2, modality="tir")
    model = tiny_model(PERSON_SIZE)
    kw = eval_kw(PERSON_SIZE)
    got = evaluate(model, str(damaged), manifest, max_damaged_share=0.01, **kw)   # 1 of 108: 0.9%
    assert got["damaged_query"] == got["damaged_gallery"] == 1

    # the expected numbers: the undamaged shards' embeddings without that sample, scored by the same protocol
    full = extract(model, str(person_shards_small), "query", **kw)
    lost = positions(person_shards_small, "query", {bad})
    keep = torch.tensor([i not in lost for i in range(108)])
    subset = {k: v[keep] for k, v in full.items() if k != "damaged"}
    want = {**score(subset, subset, manifest_protocol(manifest).match_by), **embedding_health(subset, subset, True)}
    assert {k: v for k, v in got.items() if not k.startswith("damaged_")} == pytest.approx(want, abs=1e-6)

    corrupt(damaged / "query-000002.tar", 0, modality="rgb")   # 2 of 108: 1.9%
    with pytest.raises(DamagedSplitError, match=r"evaluation split query \(also the gallery: the same shards\) "
                       r"of .*: 2 of 108 samples \(1\.9%\) .*query-000001\.tar \(1\), query-000002\.tar \(1\)"):
        evaluate(model, str(damaged), manifest, max_damaged_share=0.01, **kw)


# ---- training under the real launcher ----------------------------------------------------------------

@pytest.fixture(scope="module")
def damaged_train_shards(tmp_path_factory):
    """RGBNT100-layout shards the demo trains on (12 train ids x 3 cameras x 3 images = 108 samples; query 36
    in 3 shards, gallery 72 in 6), with a query shard cut to 60% and one gallery image corrupt; and the
    expected damaged counts."""
    root = tmp_path_factory.mktemp("raw100train")
    make_tree("rgbnt100", root, ids=24, cams=3, per_cam=3, seed=5)
    out = tmp_path_factory.mktemp("shards100train")
    build("rgbnt100", root, out, maxcount=12)
    cut = truncate(out / "query-000001.tar", 0.6)
    corrupt(out / "gallery-000003.tar", 4)
    return out, len(cut)


@pytest.mark.slow
def test_training_with_periodic_evaluation_survives_damaged_eval_shards(damaged_train_shards, tmp_path):
    shards, cut = damaged_train_shards
    manifest = read_manifest(shards)
    assert manifest["splits"]["query"]["num_samples"] == 36 and not same_shards(manifest)
    out = tmp_path / "run"
    run_deepspeed(ROOT / "launch/train.py", tiny_train_args(
        shards, out, "train.epochs=1", "train.steps_per_epoch=2", "train.eval_every=1", "train.eval_first=true",
        "data.max_damaged_share=0.5"), nprocs=2, timeout=900)
    evals = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:
        assert e["damaged_query"] == cut and e["damaged_gallery"] == 1
    final = json.loads((out / "metrics.json").read_text())
    assert final["damaged_query"] == cut and final["damaged_gallery"] == 1 and "mAP" in final


@pytest.mark.slow
def test_training_stops_with_the_message_when_the_share_is_exceeded(damaged_train_shards, tmp_path):
    shards, cut = damaged_train_shards
    out = tmp_path / "run"
    with pytest.raises(AssertionError) as info:    # run_deepspeed: the launcher exited non-zero
        run_deepspeed(ROOT / "launch/train.py", tiny_train_args(
            shards, out, "train.epochs=1", "train.steps_per_epoch=2", "train.eval_every=1",
            "train.eval_first=true"), nprocs=2, timeout=600)
    text = str(info.value)
    share = 100 * cut / 36
    assert "exited 2" in text, "a user error: one line per rank, no traceback"
    assert (f"error: rank 0: evaluation split query of {shards}: {cut} of 36 samples ({share:.1f}%) are "
            f"damaged, more than data.max_damaged_share=0.05 (5.0%) allows; damaged samples by shard: "
            f"query-000001.tar ({cut}).") in text
    assert not (out / "train_log.jsonl").exists(), "stopped at the first evaluation, before any step"
