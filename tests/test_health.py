"""Embedding health metrics and the collapse warning (pure functions), and the raw-pixel baseline (real shards)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mfrnet_ds.eval.embed import format_table, same_shards, score
from mfrnet_ds.eval.health import collapse_warning, embedding_health
from mfrnet_ds.eval.pixel import pixel_baseline
from mfrnet_ds.shards import manifest_protocol
from mfrnet_ds.stream.pipeline import eval_loader, read_manifest


def _split(emb, camids):
    return {"embedding": emb, "camids": torch.as_tensor(camids)}


def test_collapsed_embedding_is_flagged():
    same = F.normalize(torch.ones(50, 96), dim=1)
    h = embedding_health(_split(same, [0] * 50), _split(same, [0] * 50), same_split=True)
    assert h["mean_cosine"] == pytest.approx(1.0) and h["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    warning = collapse_warning(h)
    assert warning and "mean pairwise cosine 1.000" in warning and "effective rank 1.0" in warning


def test_spread_embedding_is_healthy_and_values_are_right():
    emb = F.normalize(torch.randn(400, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    h = embedding_health(_split(emb, [0] * 400), _split(emb, [0] * 400), same_split=True)
    assert abs(h["mean_cosine"]) < 0.01 and h["effective_rank"] > 50 and h["embedding_dim"] == 64
    assert collapse_warning(h) is None
    # an orthonormal set uses every direction equally: effective rank = width
    eye = torch.eye(8)
    assert embedding_health(_split(eye, range(8)), _split(eye, range(8)), False)["effective_rank"] == \
        pytest.approx(8.0)
    # mean pairwise cosine by the definition, on a small case
    emb = F.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    pairs = [float(emb[i] @ emb[j]) for i in range(5) for j in range(5) if i != j]
    assert embedding_health(_split(emb, [0] * 5), _split(emb, [0] * 5), True)["mean_cosine"] == \
        pytest.approx(sum(pairs) / len(pairs))


def test_same_camera_share_excludes_the_query_itself():
    # three queries from two cameras, query = gallery: the share follows the definition
    emb = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.1, 0.0, 1.0], [0.95, 0.05, 0.31]]), dim=1)
    sims = emb @ emb.t()
    sims.fill_diagonal_(-2)
    nearest = sims.argmax(1)
    cams = torch.tensor([0, 0, 1])
    want = (cams[nearest] == cams).double().mean().item()
    got = embedding_health(_split(emb, cams), _split(emb, cams), True)["same_camera_nn"]
    assert got == pytest.approx(want)
    # without excluding itself every query would find itself: share 1
    assert embedding_health(_split(emb, cams), _split(emb, cams), False)["same_camera_nn"] == 1.0


def test_pixel_baseline_scores_flattened_images_and_is_cached(person_shards, tmp_path):
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(person_shards, shards)
    manifest = read_manifest(shards)
    got = pixel_baseline(shards, manifest, (64, 32))
    cache = shards / "pixel_baseline_8x4.json"
    assert json.loads(cache.read_text()) == got
    # the same numbers by hand: 8x4 images flattened, L2-normalised, scored with the dataset's protocol
    parts = {k: [] for k in ("embedding", "pids", "camids", "sceneids", "valid")}
    for b in eval_loader(shards, "query", batch_size=7, img_size=(8, 4)):
        parts["embedding"].append(F.normalize(b["images"].flatten(1), dim=1))
        for k in ("pids", "camids", "sceneids", "valid"):
            parts[k].append(b[k])
    data = {k: torch.cat(v) for k, v in parts.items()}
    keep = data.pop("valid")
    query = {k: v[keep] for k, v in data.items()}
    assert same_shards(manifest)
    assert got == pytest.approx(score(query, query, manifest_protocol(manifest).match_by))
    assert all(math.isfinite(v) for v in got.values())
    cache.write_text(json.dumps({"mAP": 1.0, "R1": 2.0, "R5": 3.0, "R10": 4.0}))   # read back, not recomputed
    assert pixel_baseline(shards, manifest, (64, 32))["R10"] == 4.0
    table = format_table({"": {"mAP": 9.0, "R1": 8.0, "R5": 7.0, "R10": 6.0}}, pixel=got)
    assert "pixel baseline" in table.splitlines()[1]
