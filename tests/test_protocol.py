"""A dataset's protocol facts are declared once, by its reader, and reach the builder and the evaluator through
manifest.json: nothing downstream of raw/ tests a dataset's name, so a new dataset is one new file in raw/."""
from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
from types import SimpleNamespace

import pytest
import torch

from mfrnet_ds import raw
from mfrnet_ds.eval.embed import score
from mfrnet_ds.raw import msvr310
from mfrnet_ds.shards import build, manifest_protocol
from mfrnet_ds.synth import make_tree

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mfrnet_ds"


@pytest.mark.parametrize("dataset", sorted(raw.DATASETS))
def test_the_manifest_records_the_readers_protocol(tmp_path, dataset):
    make_tree(dataset, tmp_path / "raw", ids=4, cams=2, per_cam=2, test_ids=2)
    build(dataset, tmp_path / "raw", tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["protocol"] == json.loads(json.dumps(dataclasses.asdict(raw.PROTOCOLS[dataset])))
    assert manifest_protocol(manifest) == raw.PROTOCOLS[dataset]
    assert manifest["image_size"] == list(raw.PROTOCOLS[dataset].image_size)


def test_an_older_manifest_gets_its_readers_protocol():
    assert manifest_protocol({"dataset": "msvr310"}).match_by == "sceneids"
    assert manifest_protocol({"dataset": "rgbnt100"}).side_by_side
    assert manifest_protocol({"dataset": "rgbnt201"}).evaluates_missing


def test_the_three_protocols_differ_where_the_datasets_do():
    p = raw.PROTOCOLS
    assert [d for d in p if p[d].side_by_side] == ["rgbnt100"]
    assert [d for d in p if p[d].match_by == "sceneids"] == ["msvr310"]
    assert [d for d in p if p[d].evaluates_missing] == ["rgbnt201"]


def test_a_new_dataset_is_one_reader_registered(tmp_path, monkeypatch):
    # A fourth dataset, here MSVR310's layout under another name and protocol, needs only its reader module:
    # the builder, the manifest and the evaluator take everything else from its PROTOCOL.
    protocol = dataclasses.replace(msvr310.PROTOCOL, match_by="camids", evaluates_missing=True)

    def read(root):
        return dataclasses.replace(msvr310.read(root), name="toy310", protocol=protocol)

    module = SimpleNamespace(NAME="toy310", PROTOCOL=protocol, read=read)
    monkeypatch.setitem(raw.DATASETS, "toy310", module)
    monkeypatch.setitem(raw.READERS, "toy310", read)
    monkeypatch.setitem(raw.PROTOCOLS, "toy310", protocol)
    make_tree("msvr310", tmp_path / "raw", ids=4, cams=2, per_cam=2, test_ids=2)
    manifest = build("toy310", tmp_path / "raw", tmp_path / "shards")
    assert manifest["dataset"] == "toy310" and manifest_protocol(manifest) == protocol

    # scoring follows the recorded protocol, not the name: a query of id 1 (camera 0, scene 0) and three gallery
    # entries, nearest first: id 1 in its camera, id 2, id 1 in its scene. By camera the first is left out
    # (rank 1 is id 2); by scene the third is (rank 1 is id 1).
    query = {"embedding": torch.tensor([[1.0, 0.0]]), "pids": torch.tensor([1]), "camids": torch.tensor([0]),
             "sceneids": torch.tensor([0])}
    gallery = {"embedding": torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.5], [0.5, 1.0]]), dim=1),
               "pids": torch.tensor([1, 2, 1]), "camids": torch.tensor([0, 1, 1]), "sceneids": torch.tensor([1, 1, 0])}
    by_camera, by_scene = score(query, gallery, "camids"), score(query, gallery, "sceneids")
    assert (by_camera["R1"], by_camera["mAP"]) == (0.0, 50.0)
    assert (by_scene["R1"], by_scene["mAP"]) == (100.0, 100.0)
    assert score(query, gallery, manifest_protocol(manifest).match_by) == by_camera
    assert score(query, gallery, manifest_protocol({"dataset": "msvr310"}).match_by) == by_scene


def test_no_module_outside_raw_names_a_dataset():
    # a string constant equal to a dataset's name, outside the readers (docstrings and messages may mention one)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("raw/") or rel == "synth.py":   # synth.py writes the three layouts it knows
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in raw.DATASETS:
                offenders.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not offenders, "dataset names outside raw/ (use the manifest's protocol): " + ", ".join(offenders)
