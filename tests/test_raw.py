"""Raw-tree readers and the synthetic generator: counts, ids, cameras, scenes, relabel, junk, errors."""
from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mfrnet_ds.raw import READERS, LayoutError, read_raw
from mfrnet_ds.raw import msvr310, rgbnt100, rgbnt201
from mfrnet_ds.shards import encode_sample
from mfrnet_ds.synth import make_tree


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_synth_is_deterministic_by_seed(tmp_path):
    a = make_tree("msvr310", tmp_path / "a", ids=3, cams=2, per_cam=2, seed=5)
    b = make_tree("msvr310", tmp_path / "b", ids=3, cams=2, per_cam=2, seed=5)
    make_tree("msvr310", tmp_path / "c", ids=3, cams=2, per_cam=2, seed=6)
    assert a == b
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_synth_modalities_are_aligned_and_native_size(trees):
    root, _ = trees["rgbnt201"]
    name = sorted((root / "train_171/RGB").iterdir())[0].name
    images = [np.asarray(Image.open(root / f"train_171/{m}/{name}").convert("L"), np.float32)
              for m in ("RGB", "NI", "TI")]
    assert all(im.shape == (256, 128) for im in images)
    # The outline is at the same pixels in every modality: the vertical edges of RGB overlap those
    # of NIR and TIR best with no shift at all.
    edges = [np.abs(np.diff(im, axis=1)) > 12 for im in images]
    for other in edges[1:]:
        overlap = {dx: (edges[0] & np.roll(other, dx, axis=1)).sum() for dx in range(-6, 7)}
        assert max(overlap, key=overlap.get) == 0
    strip = Image.open(next((trees["rgbnt100"][0] / "rgbir/bounding_box_train").iterdir()))
    assert strip.size == (768, 128)


@pytest.mark.parametrize("layout", ["rgbnt201", "rgbnt100", "msvr310"])
def test_reader_counts_ids_cameras_and_relabel(trees, layout):
    root, summary = trees[layout]
    raw = read_raw(layout, root)
    assert raw.problems == [] and raw.junk == 0
    for split in ("train", "query", "gallery"):
        assert len(raw.records(split)) == summary[split], split
    assert sorted({r.pid for r in raw.records("train")}) == summary["train_ids"]
    test_pids = {r.pid for r in raw.records("query")} | {r.pid for r in raw.records("gallery")}
    assert sorted(test_pids) == summary["test_ids"]
    assert {r.camid for s in ("train", "query", "gallery") for r in raw.records(s)} == {0, 1, 2}
    # Training labels are 0..N-1 in ascending original-id order; test records keep original ids.
    by_pid = {r.pid: r.label for r in raw.records("train")}
    assert [by_pid[p] for p in sorted(by_pid)] == list(range(len(by_pid)))
    assert all(r.label == -1 for r in raw.records("query"))
    keys = [r.key for g in raw.groups.values() for r in g]
    assert len(keys) == len(set(keys)) and all("." not in k and "/" not in k for k in keys)
    if layout == "rgbnt201":
        assert raw.records("query") is raw.records("gallery")
    if layout == "msvr310":
        assert all(r.sceneid >= 1 for r in raw.records("query"))
        # Every query has a gallery entry of its id in another scene (the MSVR310 filter keeps it).
        gallery = {(r.pid, r.sceneid) for r in raw.records("gallery")}
        assert all(any(p == r.pid and s != r.sceneid for p, s in gallery) for r in raw.records("query"))
    else:
        assert all(r.sceneid == -1 for g in raw.groups.values() for r in g)


def test_name_parsing_follows_the_reference():
    assert rgbnt201.parse_name("000123_cam3_0001.jpg") == (123, 2)
    assert rgbnt201.parse_name("0001234_cam1_x.jpg") == (123, 0)  # only the first 6 characters
    assert rgbnt100.parse_name("0042_c007_00001.jpg") == (42, 6)
    assert rgbnt100.parse_name("-1_c1_00001.jpg") == (-1, 0)
    assert msvr310.parse_name("0012_s003_v5_001.jpg") == (12, 3, 5)
    for parse, bad in [(rgbnt201.parse_name, "person.jpg"), (rgbnt201.parse_name, "000001_camX_1.jpg"),
                       (rgbnt100.parse_name, "car.jpg"), (rgbnt100.parse_name, "0601_c1_1.jpg"),
                       (rgbnt100.parse_name, "0001_c9_1.jpg"), (msvr310.parse_name, "0012_s003_v9_001.jpg"),
                       (msvr310.parse_name, "ab.jpg")]:
        with pytest.raises(ValueError, match="name"):
            parse(bad)


def test_rgbnt100_junk_skipped_and_side_by_side_split(trees, tmp_path):
    root = tmp_path / "rgbnt100"
    shutil.copytree(trees["rgbnt100"][0], root)
    gallery = root / "rgbir/bounding_box_test"
    source = sorted(gallery.iterdir())[0]
    shutil.copy(source, gallery / "-1_c001_00042.jpg")
    raw = read_raw("rgbnt100", root)
    assert raw.junk == 1 and raw.problems == []
    assert len(raw.records("gallery")) == trees["rgbnt100"][1]["gallery"]
    # The three stored crops are exactly the thirds of the decoded strip, lossless.
    record = raw.records("gallery")[0]
    members = encode_sample(root, record, side_by_side=True, with_label=False)
    strip = np.asarray(Image.open(root / record.source).convert("RGB"))
    for i, modality in enumerate(("rgb", "nir", "tir")):
        crop = np.asarray(Image.open(io.BytesIO(members[f"{modality}.png"])))
        assert crop.shape == (128, 256, 3)
        assert np.array_equal(crop, strip[:, 256 * i:256 * (i + 1)])


def test_bad_inputs_are_reported_with_path_and_reason(trees, tmp_path):
    root = tmp_path / "rgbnt201"
    shutil.copytree(trees["rgbnt201"][0], root)
    names = sorted(p.name for p in (root / "train_171/RGB").iterdir())
    (root / "train_171/NI" / names[0]).unlink()
    shutil.copy(root / "train_171/RGB" / names[1], root / "train_171/RGB/badname.jpg")
    for m in ("NI", "TI"):
        shutil.copy(root / f"train_171/{m}" / names[1], root / f"train_171/{m}/badname.jpg")
    raw = read_raw("rgbnt201", root)
    problems = {p.source: p.reason for p in raw.problems}
    assert set(problems) == {f"train_171/RGB/{names[0]}", "train_171/RGB/badname.jpg"}
    assert f"train_171/NI/{names[0]}" in problems[f"train_171/RGB/{names[0]}"]
    assert "cam" in problems["train_171/RGB/badname.jpg"]
    assert len(raw.records("train")) == trees["rgbnt201"][1]["train"] - 1


@pytest.mark.parametrize("layout, expected", [
    ("rgbnt201", ["train_171/RGB/", "test/TI/"]),
    ("rgbnt100", ["bounding_box_train/", "query/", "bounding_box_test/"]),
    ("msvr310", ["bounding_box_train/", "query3/", "bounding_box_test/"]),
])
def test_wrong_root_names_the_expected_folders(tmp_path, layout, expected):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(LayoutError) as info:
        READERS[layout](tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and layout in message
    assert all(folder in message for folder in expected)
