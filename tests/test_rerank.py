import numpy as np
import pytest
import torch

from mfrnet_ds.eval import embed
from mfrnet_ds.eval.metrics import evaluate_rank
from mfrnet_ds.eval.rerank import _nearest, k_reciprocal
from mfrnet_ds.raw import PROTOCOLS


def fixed_case(name):
    torch.manual_seed(0)
    query, gallery = torch.randn(7, 8), torch.randn(11, 8)
    if name == "duplicates":
        # Three copies of one gallery sample, a query equal to a gallery sample, two equal queries:
        # exact ties at the top of many rows. k1 = 5 also checks that k1/2 rounds half to even (to 2).
        gallery[3] = gallery[0]
        gallery[7] = gallery[0]
        query[2] = gallery[5]
        query[6] = query[4]
        return query, gallery, dict(k1=5, k2=3, lam=0.3)
    return query, gallery, dict(k1=6, k2=3, lam=0.3)


# Produced by the reference `re_ranking(probFea, galFea, k1, k2, lambda_value)` of TransReID's
# utils/reranking.py (read from the copies in 924973292/EDITOR and CDTrans/CDTrans, which are identical;
# TOP-ReID's and MFRNet's evaluators import that function), run as is on fixed_case's inputs with
# k1, k2, lambda_value = the case's k1, k2, lam, under torch 2.14 / NumPy 2.4; rounded to 6 decimals.
# That code stores V, its query expansion and the Jaccard term in float16 and computes 1 - t / (2 - t)
# there, which costs up to a few float16 spacings near 1 (2^-11 each): up to 4 of them (0.7 * 2^-9 =
# 1.4e-3) were seen here, up to 7 over random cases. So these only pin the result to within
# (1 - lam) * 8 * 2^-11 = 2.7e-3; the float32 tables below are the tight check.
REFERENCE = {
    "random": [
        [0.921582, 0.487532, 0.386143, 0.728285, 0.586633, 0.333745, 0.555513, 0.549311, 0.631618, 0.528236, 0.546290],
        [0.945508, 0.278044, 0.187309, 0.737472, 0.723639, 0.553580, 0.645965, 0.481022, 0.466741, 0.236355, 0.641379],
        [0.918164, 0.675404, 0.724663, 0.050165, 0.724193, 0.705883, 0.683140, 0.772729, 0.874629, 0.652138, 0.695895],
        [0.945508, 0.310133, 0.163822, 0.798980, 0.725700, 0.532765, 0.631233, 0.467499, 0.483085, 0.248690, 0.646143],
        [0.927930, 0.053126, 0.364675, 0.636754, 0.645815, 0.516456, 0.508676, 0.533853, 0.568408, 0.295442, 0.592811],
        [0.945508, 0.265842, 0.184552, 0.776502, 0.688933, 0.522845, 0.579027, 0.436164, 0.464282, 0.252538, 0.627632],
        [0.902539, 0.405492, 0.697881, 0.514480, 0.665282, 0.709762, 0.538519, 0.649022, 0.664138, 0.555606, 0.656290],
    ],
    "duplicates": [
        [1.000195, 0.639875, 0.625401, 1.000195, 0.571008, 0.269414, 0.539155, 1.000195, 0.876735, 0.634682, 0.530665],
        [1.000195, 0.685758, 0.476615, 1.000195, 0.854010, 0.730582, 0.760223, 1.000195, 0.466741, 0.551541, 0.771750],
        [0.981646, 0.627823, 0.631624, 0.981646, 0.387892, 0.000000, 0.473609, 0.981646, 0.953320, 0.600947, 0.340491],
        [1.000195, 0.717848, 0.453129, 1.000195, 0.856072, 0.709767, 0.745491, 1.000195, 0.483085, 0.563876, 0.776514],
        [1.000195, 0.051758, 0.663748, 1.000195, 0.707827, 0.579200, 0.418100, 1.000195, 0.798388, 0.412751, 0.654823],
        [1.000195, 0.673557, 0.473859, 1.000195, 0.819304, 0.699847, 0.693284, 1.000195, 0.464282, 0.567724, 0.758004],
        [1.000195, 0.051758, 0.663748, 1.000195, 0.707827, 0.579200, 0.418100, 1.000195, 0.798388, 0.412751, 0.654823],
    ],
}

# The same reference function with its four float16 dtypes (V, V_qe, jaccard_dist, temp_min) changed to
# float32 and nothing else; same inputs and arguments. What remains is float32 rounding in different
# summation orders (~1e-7 seen) and the 6-decimal rounding (5e-7), so rtol 1e-5 with atol 1e-6; another
# BLAS may round the float32 distance matrix differently, which moves the result by ~1e-7 too.
REFERENCE_FLOAT32 = {
    "random": [
        [0.921455, 0.487396, 0.385794, 0.728377, 0.586709, 0.333652, 0.555086, 0.549427, 0.631457, 0.528183, 0.546366],
        [0.945226, 0.278182, 0.187602, 0.737105, 0.723107, 0.553177, 0.645819, 0.480590, 0.466887, 0.235965, 0.640846],
        [0.917805, 0.675068, 0.724442, 0.048798, 0.724204, 0.705504, 0.683008, 0.772507, 0.874263, 0.652080, 0.695907],
        [0.945226, 0.310272, 0.164115, 0.798613, 0.725168, 0.532362, 0.631087, 0.467067, 0.483232, 0.248300, 0.645610],
        [0.927616, 0.053126, 0.364722, 0.636418, 0.645684, 0.516013, 0.508592, 0.533993, 0.569069, 0.294671, 0.592680],
        [0.945226, 0.265981, 0.184846, 0.776135, 0.688400, 0.522442, 0.578880, 0.435732, 0.464428, 0.252148, 0.627100],
        [0.902532, 0.405508, 0.697964, 0.514071, 0.665541, 0.709659, 0.538679, 0.648918, 0.664181, 0.555004, 0.656548],
    ],
    "duplicates": [
        [1.000000, 0.639819, 0.625342, 1.000000, 0.570493, 0.269391, 0.538778, 1.000000, 0.876535, 0.634625, 0.530151],
        [1.000000, 0.685891, 0.476517, 1.000000, 0.853833, 0.730381, 0.760356, 1.000000, 0.466887, 0.551809, 0.771572],
        [0.981450, 0.627767, 0.631565, 0.981450, 0.388313, 0.000000, 0.473203, 0.981450, 0.953120, 0.600890, 0.340912],
        [1.000000, 0.717981, 0.453030, 1.000000, 0.855894, 0.709566, 0.745624, 1.000000, 0.483232, 0.564143, 0.776336],
        [1.000000, 0.053126, 0.663563, 1.000000, 0.707582, 0.579144, 0.418247, 1.000000, 0.798521, 0.412898, 0.654578],
        [1.000000, 0.673690, 0.473761, 1.000000, 0.819126, 0.699647, 0.693417, 1.000000, 0.464428, 0.567992, 0.757826],
        [1.000000, 0.053126, 0.663563, 1.000000, 0.707582, 0.579144, 0.418247, 1.000000, 0.798521, 0.412898, 0.654578],
    ],
}


@pytest.mark.parametrize("name", ["random", "duplicates"])
def test_matches_the_reference_implementation(name):
    # The duplicates case was checked to give the same reference numbers whichever way its argsort
    # breaks the exact ties (NumPy's default, stable, reverse-stable), so it does not depend on the
    # NumPy build's sort.
    query, gallery, kw = fixed_case(name)
    got = k_reciprocal(query, gallery, **kw)
    assert got.shape == (7, 11) and got.dtype == np.float64
    np.testing.assert_allclose(got, REFERENCE_FLOAT32[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, REFERENCE[name], rtol=0, atol=(1 - kw["lam"]) * 8 * 2.0 ** -11)
    # numpy input, float64 input: the same float32 computation
    np.testing.assert_array_equal(k_reciprocal(query.numpy(), gallery.double().numpy(), **kw), got)


def test_nearest_breaks_ties_like_a_full_argsort():
    # Few distinct values: most rows have ties inside or straddling the kept head.
    rng = np.random.default_rng(0)
    dist = rng.integers(0, 6, (300, 50)).astype(np.float32)
    dist[::3] = rng.random((100, 50)).astype(np.float32)  # and rows without ties take the partition path
    for width in (1, 7, 21, 50):
        np.testing.assert_array_equal(_nearest(dist, width), np.argsort(dist, axis=1)[:, :width])


def clustered(seed, ids=20, per_query=2, per_gallery=8, dim=64, spread=1.6):
    """Gaussian identity clusters whose spread (1.6 per dimension, centres ~1.4 apart per dimension)
    puts other identities among a query's nearest gallery entries (plain mAP ~0.6), while members of one
    cluster still tend to be each other's reciprocal neighbours and share neighbourhoods."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(ids, dim, generator=gen)
    q_pids = torch.arange(ids).repeat_interleave(per_query)
    g_pids = torch.arange(ids).repeat_interleave(per_gallery)
    query = centre[q_pids] + spread * torch.randn(len(q_pids), dim, generator=gen)
    gallery = centre[g_pids] + spread * torch.randn(len(g_pids), dim, generator=gen)
    return query, gallery, q_pids, g_pids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_re_ranking_improves_map_on_overlapping_clusters(seed):
    query, gallery, q_pids, g_pids = clustered(seed)
    q_cams, g_cams = np.zeros(len(q_pids)), np.ones(len(g_pids))  # no gallery entry is filtered out
    plain = torch.cdist(query, gallery).pow(2).numpy()
    _, map_plain = evaluate_rank(plain, q_pids, g_pids, q_cams, g_cams)
    _, map_rerank = evaluate_rank(k_reciprocal(query, gallery), q_pids, g_pids, q_cams, g_cams)
    assert map_plain < 0.7
    assert map_rerank > map_plain + 0.1, (map_plain, map_rerank)  # measured +0.2 to +0.28


@pytest.mark.parametrize("dataset", ["rgbnt201", "msvr310"])
def test_score_re_ranking_keeps_the_protocol(dataset):
    query, gallery, q_pids, g_pids = clustered(0)
    query, gallery = torch.nn.functional.normalize(query, dim=1), torch.nn.functional.normalize(gallery, dim=1)
    rng = np.random.default_rng(0)
    # Cameras that remove some same-id gallery entries, and different scene ids, so the two protocols differ.
    q_side = {"embedding": query, "pids": q_pids, "camids": torch.from_numpy(rng.integers(0, 3, len(q_pids))),
              "sceneids": torch.from_numpy(rng.integers(0, 2, len(q_pids)))}
    g_side = {"embedding": gallery, "pids": g_pids, "camids": torch.from_numpy(rng.integers(0, 3, len(g_pids))),
              "sceneids": torch.from_numpy(rng.integers(0, 2, len(g_pids)))}
    slot = PROTOCOLS[dataset].match_by
    # score() re-ranks with the reference evaluator's k1=50, k2=15, lambda=0.3
    reranked = k_reciprocal(query, gallery, k1=50, k2=15, lam=0.3)
    cmc, mAP = evaluate_rank(reranked, q_pids, g_pids, q_side[slot], g_side[slot])
    got = embed.score(q_side, g_side, slot, re_ranking=True)
    assert got == pytest.approx({"mAP": 100 * mAP, "R1": 100 * cmc[0], "R5": 100 * cmc[4], "R10": 100 * cmc[9]})
    assert got["mAP"] > embed.score(q_side, g_side, slot)["mAP"]


def test_evaluate_settings_passes_re_ranking_to_every_setting(monkeypatch):
    seen = []
    monkeypatch.setattr(embed, "evaluate", lambda *a, missing, re_ranking, **kw: seen.append((missing, re_ranking)))
    embed.evaluate_settings(None, "shards", {}, ["", "r"], rank=0, re_ranking=True)
    embed.evaluate_settings(None, "shards", {}, [""], rank=0)
    assert seen == [("", True), ("r", True), ("", False)]


def test_evaluate_launcher_has_the_flag(capsys):
    from launch.evaluate import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--re-ranking" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (dict(gallery=torch.randn(11, 9)), r"gallery: feature width 9 differs from the query's 8"),
    (dict(query=torch.randn(8)), r"query: expected a 2-D"),
    (dict(gallery=torch.randn(0, 8)), r"gallery: empty"),
    (dict(query=torch.full((7, 8), float("nan"))), r"query: features contain NaN"),
    (dict(k1=18), r"k1=18: expected 1 <= k1 <= 17; .* hold 18 samples"),
    (dict(k1=100), r"k1=100: expected 1 <= k1 <= 17"),
    (dict(k1=0), r"k1=0: expected 1 <= k1"),
    (dict(k1=2.5), r"k1: expected an integer"),
    (dict(k2=0), r"k2=0: expected 1 <= k2 <= 18"),
    (dict(k2=19), r"k2=19: expected 1 <= k2 <= 18"),
    (dict(lam=1.5), r"lam: expected a weight in \[0, 1\]"),
    (dict(query=torch.ones(7, 8), gallery=torch.ones(11, 8)), r"identical features"),
])
def test_bad_input_names_the_argument(bad, message):
    query, gallery, kw = fixed_case("random")
    args = dict(query=query, gallery=gallery, **kw) | bad
    with pytest.raises(ValueError, match=message):
        k_reciprocal(**args)


def test_default_parameters_need_more_than_k1_samples():
    # The paper's k1 = 20 with 7 + 11 samples: rejected rather than silently using fewer neighbours.
    query, gallery, _ = fixed_case("random")
    with pytest.raises(ValueError, match=r"k1=20: .*k1 nearest neighbours besides itself"):
        k_reciprocal(query, gallery)


def test_chunking_does_not_change_the_result(monkeypatch):
    from mfrnet_ds.eval import rerank
    query, gallery, q_pids, g_pids = clustered(3, ids=12, per_query=3, per_gallery=6, dim=16)
    gallery[5] = gallery[4]  # a tie, so a tied row takes the full-sort path inside a small chunk
    expected = k_reciprocal(query, gallery, k1=10, k2=4)
    monkeypatch.setattr(rerank, "_SORT_CHUNK_ELEMENTS", 200)  # one row (of 108) per argsort call
    monkeypatch.setattr(rerank, "_JOIN_CHUNK_PAIRS", 50)      # about one query row per join
    np.testing.assert_array_equal(k_reciprocal(query, gallery, k1=10, k2=4), expected)
