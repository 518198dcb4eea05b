import numpy as np
import pytest
import torch

from mfrnet_ds.eval import metrics
from mfrnet_ds.eval.metrics import evaluate_rank, evaluate_rank_loop


def assert_identical(a, b):
    (cmc_a, map_a), (cmc_b, map_b) = a, b
    assert cmc_a.dtype == cmc_b.dtype == np.float32
    assert cmc_a.shape == cmc_b.shape
    assert np.array_equal(cmc_a, cmc_b), (cmc_a, cmc_b)
    assert map_a == map_b, (map_a, map_b)  # bit-identical, not approximately equal


def random_problem(seed, protocol, ties):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(1, 60)), int(rng.integers(1, 150))
    num_ids = int(rng.integers(1, 12))
    # Market-1501 protocol: a few cameras. MSVR310: scene ids in the camera slots (many values).
    num_groups = int(rng.integers(1, 5)) if protocol == "camera" else int(rng.integers(5, 40))
    if ties == "integer":
        distmat = rng.integers(0, 5, (num_q, num_g)).astype(np.float64)
    elif ties == "signed-zero":
        distmat = np.round(rng.standard_normal((num_q, num_g)), 1).astype(np.float32)
        distmat[rng.random(distmat.shape) < 0.2] = -0.0
        distmat[rng.random(distmat.shape) < 0.2] = 0.0
    else:
        distmat = rng.random((num_q, num_g)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
    q_cams, g_cams = rng.integers(0, num_groups, num_q), rng.integers(0, num_groups, num_g)
    q_pids[0] = num_ids + 7  # at least one query whose id is absent from the gallery
    return distmat, q_pids, g_pids, q_cams, g_cams, int(rng.integers(1, 60)), int(rng.integers(1, 9))


@pytest.mark.filterwarnings("ignore:number of gallery samples")
@pytest.mark.parametrize("path", ["auto", "cells", "sort"])
@pytest.mark.parametrize("ties", ["none", "integer", "signed-zero"])
@pytest.mark.parametrize("protocol", ["camera", "scene"])
def test_vectorised_equals_loop_on_random_inputs(protocol, ties, path, monkeypatch):
    # "cells": never fall back to sorting, however many entries need the exact comparison;
    # "sort": always take the fallback.
    if path != "auto":
        monkeypatch.setattr(metrics, "_EXACT_FRACTION_MAX", 2.0 if path == "cells" else -1.0)
    compared = skipped_queries = 0
    for seed in range(30):
        distmat, q_pids, g_pids, q_cams, g_cams, max_rank, chunk = random_problem(seed, protocol, ties)
        try:
            expected = evaluate_rank_loop(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
        except ValueError:
            with pytest.raises(ValueError, match="no valid query"):
                evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank, chunk_rows=chunk)
            continue
        assert_identical(expected, evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank,
                                                 chunk_rows=chunk))
        assert_identical(expected, evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank))
        compared += 1
        skipped_queries += 1  # the absent-id query above
    assert compared >= 22 and skipped_queries == compared


def test_query_set_equals_gallery_set_like_rgbnt201():
    # RGBNT201 evaluates the test set against itself: each query sees itself at distance 0.
    rng = np.random.default_rng(3)
    pids = rng.integers(0, 30, 300)
    cams = rng.integers(0, 4, 300)
    feats = rng.standard_normal((300, 16)).astype(np.float32) + 2 * np.eye(30, 16, dtype=np.float32)[pids]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    distmat = np.maximum(2 - 2 * feats @ feats.T, 0)
    assert_identical(evaluate_rank_loop(distmat, pids, pids, cams, cams),
                     evaluate_rank(distmat, pids, pids, cams, cams, chunk_rows=7))


def test_large_gallery_uses_the_cell_path_and_stays_exact(monkeypatch):
    # Enough gallery entries that most are resolved through the lookup table, not the exact search.
    rng = np.random.default_rng(11)
    num_q, num_g = 64, 5000
    distmat = rng.random((num_q, num_g)).astype(np.float32)
    distmat[:, ::97] = distmat[:, 1::97]  # plus exact ties across entries
    q_pids, g_pids = rng.integers(0, 100, num_q), rng.integers(0, 100, num_g)
    q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    distmat[:, 7] = 1e6  # a far outlier must not push everything into a few cells

    def no_sort(*args):
        raise AssertionError("fell back to sorting")

    monkeypatch.setattr(metrics, "_entries_below_by_sort", no_sort)
    for dtype in (np.float32, np.float64):
        d = distmat.astype(dtype)
        assert_identical(evaluate_rank_loop(d, q_pids, g_pids, q_cams, g_cams),
                         evaluate_rank(d, q_pids, g_pids, q_cams, g_cams))


def test_hand_computed_case():
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],    # id 1, cam 0: g0 removed; hits at kept ranks 2, 4
                        [0.1, 0.2, 0.3, 0.4, 0.5],    # id 2, cam 1: its only match g1 removed: skipped
                        [0.3, 0.3, 0.3, 0.3, 0.3]])   # id 3, cam 1: all tied, stable order; hit at rank 4
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 1, 1])
    g_pids, g_cams = np.array([1, 2, 1, 3, 1]), np.array([0, 1, 1, 0, 1])
    expected_cmc = np.array([0.0, 0.5, 0.5, 1.0], dtype=np.float32)
    expected_map = ((1 / 2 + 2 / 4) / 2 + 1 / 4) / 2
    for fn in (evaluate_rank, evaluate_rank_loop):
        cmc, mean_ap = fn(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=4)
        np.testing.assert_array_equal(cmc, expected_cmc)
        assert mean_ap == pytest.approx(expected_map, abs=1e-12)


def test_scene_protocol_removes_same_scene_not_same_camera():
    # MSVR310 passes scene ids where the camera ids go: g0 shares the query's scene, not its camera.
    distmat = np.array([[0.1, 0.2, 0.3]])
    q_pids, g_pids = np.array([5]), np.array([5, 6, 5])
    cams_q, cams_g = np.array([0]), np.array([1, 1, 2])
    scenes_q, scenes_g = np.array([7]), np.array([7, 8, 8])
    for fn in (evaluate_rank, evaluate_rank_loop):
        cmc, mean_ap = fn(distmat, q_pids, g_pids, cams_q, cams_g, max_rank=2)
        assert cmc.tolist() == [1.0, 1.0] and mean_ap == pytest.approx((1 + 2 / 3) / 2)  # all kept
        cmc, mean_ap = fn(distmat, q_pids, g_pids, scenes_q, scenes_g, max_rank=2)
        assert cmc.tolist() == [0.0, 1.0] and mean_ap == 0.5  # g0 removed: the hit is g2 at rank 2


@pytest.mark.parametrize("fn", [evaluate_rank, evaluate_rank_loop])
def test_no_valid_query_raises(fn):
    distmat = np.random.default_rng(0).random((3, 4))
    with pytest.raises(ValueError, match="no valid query"):  # ids absent from the gallery
        fn(distmat, np.array([9, 9, 8]), np.array([1, 2, 3, 4]), np.zeros(3), np.zeros(4), max_rank=4)
    with pytest.raises(ValueError, match="no valid query"):  # only same-camera matches
        fn(distmat, np.array([1, 1, 2]), np.array([1, 2, 1, 2]), np.zeros(3), np.zeros(4), max_rank=4)
    with pytest.raises(ValueError, match="no valid query"):  # no queries at all
        fn(np.zeros((0, 4)), np.zeros(0), np.array([1, 2, 1, 2]), np.zeros(0), np.zeros(4), max_rank=4)


@pytest.mark.parametrize("fn", [evaluate_rank, evaluate_rank_loop])
def test_max_rank_clipped_to_gallery_with_warning(fn):
    distmat = np.array([[0.3, 0.1, 0.2]])
    with pytest.warns(UserWarning, match="number of gallery samples"):
        cmc, mean_ap = fn(distmat, np.array([1]), np.array([2, 3, 1]), np.array([0]), np.array([1, 1, 1]))
    assert cmc.tolist() == [0.0, 1.0, 1.0] and mean_ap == 0.5


def test_accepts_torch_tensors():
    rng = np.random.default_rng(5)
    distmat = rng.random((20, 40)).astype(np.float32)
    args = (rng.integers(0, 5, 20), rng.integers(0, 5, 40), rng.integers(0, 3, 20), rng.integers(0, 3, 40))
    expected = evaluate_rank(distmat, *args, max_rank=10)
    assert_identical(expected, evaluate_rank(torch.from_numpy(distmat), *map(torch.from_numpy, args), max_rank=10))
    half = torch.from_numpy(distmat).bfloat16()
    assert_identical(evaluate_rank_loop(half.float().numpy(), *args, max_rank=10),
                     evaluate_rank(half, *args, max_rank=10))


@pytest.mark.parametrize("fn", [evaluate_rank, evaluate_rank_loop])
def test_bad_inputs_are_named(fn):
    distmat = np.zeros((2, 3))
    ids2, ids3 = np.array([1, 2]), np.array([1, 2, 1])
    with pytest.raises(ValueError, match=r"g_pids: expected shape \(3,\)"):
        fn(distmat, ids2, ids2, ids2, ids3)
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros(3), ids2, ids3, ids2, ids3)
    with pytest.raises(ValueError, match="max_rank"):
        fn(distmat, ids2, ids3, ids2, ids3, max_rank=0)
    bad = np.array([[0.1, np.nan, 0.2], [0.1, 0.2, np.inf]])
    with pytest.raises(ValueError, match="non-finite"):
        fn(bad, ids2, ids3, np.array([0, 0]), np.array([1, 1, 1]), max_rank=3)


@pytest.mark.parametrize("fn", [evaluate_rank, evaluate_rank_loop])
def test_non_finite_in_a_skipped_query_is_still_rejected(fn):
    distmat = np.array([[0.1, 0.2], [np.nan, 0.3]])  # query 1 has no match and would be skipped
    with pytest.raises(ValueError, match=r"non-finite.*\[1\]"):
        fn(distmat, np.array([1, 9]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1]), max_rank=2)
