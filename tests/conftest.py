"""Session-wide synthetic data for the data tests: small raw trees of every layout, and shards."""
from __future__ import annotations

import pytest

from mfrnet_ds.shards import build
from mfrnet_ds.synth import make_tree


@pytest.fixture(scope="session")
def trees(tmp_path_factory):
    """layout -> (root, summary): 8 ids (4 train, 4 test) x 3 cameras x 2 images."""
    base = tmp_path_factory.mktemp("raw")
    return {layout: (base / layout, make_tree(layout, base / layout, ids=8, cams=3, per_cam=2, seed=1))
            for layout in ("rgbnt201", "rgbnt100", "msvr310")}


@pytest.fixture(scope="session")
def person_tree(tmp_path_factory):
    """RGBNT201 layout, 16 ids (8 train, 8 test) x 3 cameras x 4 images = 96 train samples."""
    root = tmp_path_factory.mktemp("persons")
    return root, make_tree("rgbnt201", root, ids=16, cams=3, per_cam=4, seed=2)


@pytest.fixture(scope="session")
def person_shards(person_tree, tmp_path_factory):
    """Shards of person_tree, 24 samples per shard: 4 train shards of 2 whole identities each."""
    out = tmp_path_factory.mktemp("person_shards")
    build("rgbnt201", person_tree[0], out, maxcount=24)
    return out
