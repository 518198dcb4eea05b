"""Shard builder: manifest counts, sample schema, wids index, determinism, atomicity, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mfrnet_ds.shards import build

REPO = Path(__file__).resolve().parents[1]
BUILD = [sys.executable, str(REPO / "shards/build.py")]


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


@pytest.mark.parametrize("layout", ["rgbnt201", "rgbnt100", "msvr310"])
def test_manifest_counts_match_the_raw_tree_and_schema(trees, tmp_path, layout):
    root, summary = trees[layout]
    manifest = build(layout, root, tmp_path, maxcount=10)
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dataset"] == layout and manifest["modalities"] == ["rgb", "nir", "tir"]
    assert manifest["image_size"] == ([256, 128] if layout == "rgbnt201" else [128, 256])
    assert manifest["num_cameras"] == 3 and manifest["num_classes"] == len(summary["train_ids"])
    assert manifest["num_scenes"] == (0 if layout != "msvr310" else 16)  # 8 ids x 2 scenes
    assert manifest["skipped"] == [] and manifest["junk_skipped"] == 0
    for split in ("train", "query", "gallery"):
        entry = manifest["splits"][split]
        assert entry["num_samples"] == summary[split]
        assert entry["num_ids"] == len(summary["train_ids" if split == "train" else "test_ids"])
        assert sum(s["num_samples"] for s in entry["shards"]) == summary[split]
        keys = set()
        for shard in entry["shards"]:
            samples = _samples(tmp_path / shard["name"])
            assert len(samples) == shard["num_samples"] <= 10
            keys |= samples.keys()
            for key, members in samples.items():
                ext = "png" if layout == "rgbnt100" else "jpg"
                assert set(members) == {"json", f"rgb.{ext}", f"nir.{ext}", f"tir.{ext}"}
                meta = json.loads(members["json"])
                assert set(meta) == {"pid", "camid", "sceneid", "source"} | ({"label"} if split == "train" else set())
                assert (meta["sceneid"] >= 1) == (layout == "msvr310") and 0 <= meta["camid"] < 3
                assert (root / meta["source"]).is_file()
                if ext == "jpg":  # original bytes kept
                    assert members["rgb.jpg"] == (root / meta["source"]).read_bytes()
        assert len(keys) == summary[split]
        index = json.loads((tmp_path / entry["wids_index"]).read_text())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert [s["url"] for s in index["shardlist"]] == [s["name"] for s in entry["shards"]]
        assert all(s["filesize"] == (tmp_path / s["url"]).stat().st_size for s in index["shardlist"])
    if layout == "rgbnt201":  # one test set, listed for both
        assert manifest["splits"]["query"]["shards"] == manifest["splits"]["gallery"]["shards"]
        assert not list(tmp_path.glob("gallery-*.tar"))


def test_train_shards_hold_whole_identities(person_shards):
    manifest = json.loads((person_shards / "manifest.json").read_text())
    owner = {}
    for shard in manifest["splits"]["train"]["shards"]:
        for members in _samples(person_shards / shard["name"]).values():
            label = json.loads(members["json"])["label"]
            assert owner.setdefault(label, shard["name"]) == shard["name"]
    assert len(owner) == manifest["num_classes"] == 8


def test_wids_reads_the_index(person_shards):
    wids = pytest.importorskip("wids")
    ds = wids.ShardListDataset(str(person_shards / "train.wids.json"), transformations=[],
                               localname=lambda url: url)
    manifest = json.loads((person_shards / "manifest.json").read_text())
    assert len(ds) == manifest["splits"]["train"]["num_samples"]
    sample = ds[len(ds) - 1]
    assert {".rgb.jpg", ".nir.jpg", ".tir.jpg", ".json"} <= set(sample)


def test_build_is_deterministic_with_any_worker_count(person_tree, tmp_path):
    build("rgbnt201", person_tree[0], tmp_path / "a", maxcount=20, workers=1)
    build("rgbnt201", person_tree[0], tmp_path / "b", maxcount=20, workers=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) > 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_skip_records_bad_input_and_fail_exits_nonzero(trees, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(trees["rgbnt201"][0], root)
    broken = sorted((root / "test/TI").iterdir())[0]
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    manifest = build("rgbnt201", root, tmp_path / "skip", maxcount=10)
    assert [s["source"] for s in manifest["skipped"]] == [f"test/RGB/{broken.name}"]
    assert f"test/TI/{broken.name}" in manifest["skipped"][0]["reason"]
    assert manifest["splits"]["query"]["num_samples"] == trees["rgbnt201"][1]["query"] - 1

    result = subprocess.run(BUILD + ["--dataset", "rgbnt201", "--root", str(root), "--out", str(tmp_path / "fail"),
                                     "--on-error", "fail", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"test/TI/{broken.name}" in result.stderr
    assert not (tmp_path / "fail/manifest.json").exists() and not list((tmp_path / "fail").glob("*.tar"))


def test_wrong_root_gives_one_error_naming_the_folders(tmp_path):
    (tmp_path / "RGBNT201/whatever").mkdir(parents=True)
    result = subprocess.run(BUILD + ["--dataset", "rgbnt201", "--root", str(tmp_path / "RGBNT201"),
                                     "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "train_171/RGB/" in result.stderr and "test/NI/" in result.stderr
    assert "Traceback" not in result.stderr


def _complete_tar(path: Path) -> bool:
    try:
        samples = _samples(path)
    except (tarfile.TarError, EOFError, ValueError):
        return False
    return bool(samples) and all(set(m) == {"json", "rgb.jpg", "nir.jpg", "tir.jpg"} for m in samples.values())


@pytest.mark.parametrize("wait_for", [1, 40])
def test_killed_build_leaves_no_incomplete_file_under_a_final_name(person_tree, tmp_path, wait_for):
    """SIGKILL once `wait_for` shards are published; every final-named file must then be complete."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(BUILD + ["--dataset", "rgbnt201", "--root", str(person_tree[0]), "--out", str(out),
                                     "--maxcount", "1", "--workers", "2", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.tar"))) < wait_for and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the builder and its worker processes
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be interrupted"
    assert not (out / "manifest.json").exists()
    finals = list(out.glob("*.tar"))
    assert len(finals) < 192 and all(_complete_tar(p) for p in finals)
    # A new build over the debris finishes and cleans up the temporaries of the killed one.
    manifest = build("rgbnt201", person_tree[0], out, maxcount=50)
    assert manifest["splits"]["train"]["num_samples"] == person_tree[1]["train"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s["name"] for split in ("train", "query") for s in manifest["splits"][split]["shards"])
