"""k-reciprocal re-ranking of query-gallery distances (Zhong et al., CVPR 2017), the reference codes'
TEST.RE_RANKING option.

Everything after the joint distance matrix is sparse: a sample's encoding is non-zero only on its
expanded k-reciprocal set and those of its k2 nearest neighbours (about 100 of 3,000 samples with
k1=20, k2=6), so the encodings V are kept as (row, column, value) lists and the Jaccard distance is a
join of query and gallery entries on their shared column, instead of the dense (Q+G)^2 float16 matrices
and per-row Python loops of the reference implementation.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

# Rows per argsort call are chosen so one call sorts about this many distances: bounds the int64
# temporary (8 bytes a distance) without many small calls.
_SORT_CHUNK_ELEMENTS = 1 << 22
# Query-gallery pairs materialised at once in the Jaccard join (about 40 bytes each in temporaries).
_JOIN_CHUNK_PAIRS = 1 << 22


def k_reciprocal(query: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray, k1: int = 20, k2: int = 6,
                 lam: float = 0.3) -> np.ndarray:
    """Re-ranked (num_query, num_gallery) float64 distances: k-reciprocal encoding of Zhong, Zheng, Cao and
    Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.

    query, gallery: (Q, d) and (G, d) features (torch or numpy; converted to float32, as the reference
    computes on float32 features). With the paper's parameters (k1=20, k2=6, lam=0.3 by default) the
    result is

        lam * d(q, g) / max_x d(x, q)  +  (1 - lam) * d_J(q, g)

    where d is the squared Euclidean distance over all Q+G samples, and d_J the Jaccard distance
    1 - sum(min) / sum(max) between the query's and the gallery sample's encodings V: exp(-d) weights over
    the sample's k1-reciprocal set, widened by the half-size (k1/2) reciprocal sets of its members that
    share more than 2/3 of their members with it, L1-normalised, then averaged over the sample's k2
    nearest neighbours (local query expansion).

    It reproduces `re_ranking(probFea, galFea, k1, k2, lambda_value)` of TransReID's utils/reranking.py
    (which TOP-ReID's and MFRNet's evaluators import, and call with k1=50, k2=15, lambda=0.3) up to that
    code's float16 storage of V and of the Jaccard term, a few 1e-3 absolute at worst; with those float16
    matrices widened to float32 the two agree to ~1e-6.
    Exactly tied distances (duplicate features) are ordered by NumPy's default argsort, as there, so a tie
    that straddles one of the k1 + 1, k1/2 + 1 or k2 cut-offs is decided the same way on the same NumPy.

    Memory: the neighbour sets of gallery samples are taken among queries and gallery alike (a gallery
    sample's own k1 nearest neighbours decide whether it and a query are reciprocal), so all (Q+G)^2
    squared distances are needed, as float32: 4 (Q+G)^2 bytes, twice that while the matrix is
    transposed (the reference's normalisation divides each column by its maximum, then reads rows).
    The rest is O((Q+G) k1^2) plus the (Q, G) float64 result; e.g. Q + G = 10,000 peaks at ~0.8 GB.

    Raises ValueError for inputs that are not 2-D, have different widths or hold NaN/inf, for
    k1 >= Q + G (a sample needs k1 neighbours besides itself), k2 outside [1, Q + G] or lam outside [0, 1].
    """
    q = _features("query", query)
    g = _features("gallery", gallery, device=q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery: feature width {g.shape[1]} differs from the query's {q.shape[1]} "
                         f"(query shape {tuple(q.shape)}, gallery shape {tuple(g.shape)})")
    num_q, n = q.shape[0], q.shape[0] + g.shape[0]
    k1 = _int_arg("k1", k1, 1, n - 1, f"each sample needs its k1 nearest neighbours besides itself, and "
                                      f"query + gallery hold {n} samples")
    k2 = _int_arg("k2", k2, 1, n, f"query + gallery hold {n} samples")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam: expected a weight in [0, 1], got {lam!r}")
    lam = float(lam)

    dist = _normalised_distances(torch.cat([q, g]))
    rank = _nearest(dist, max(k1 + 1, k2))
    row, col = _expanded_sets(rank, k1)
    # Only the kept entries' weights are ever read, so the exponentials stay sparse; float64 because
    # the row normalisation sums up to ~k1^2 / 2 terms.
    weight = np.exp(-dist[row, col].astype(np.float64))
    weight /= np.bincount(row, weights=weight, minlength=n)[row]
    indptr = _indptr(row, n)
    if k2 > 1:  # k2 = 1 is no expansion (the reference skips it, not averaging over rank[:, :1])
        row, col, weight = _expand_queries(rank[:, :k2], indptr, col, weight, n)
        indptr = _indptr(row, n)
    overlap = _min_overlap(indptr, col, weight, num_q, n)
    jaccard = 1.0 - overlap / (2.0 - overlap)  # sum(max) = 2 - sum(min): each encoding sums to 1
    return lam * dist[:num_q, num_q:].astype(np.float64) + (1.0 - lam) * jaccard


def _features(name: str, value, device=None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    elif not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except Exception as exc:
            raise ValueError(f"{name}: cannot convert {type(value).__name__} to a feature matrix") from exc
    if value.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (num_samples, dim) feature matrix, got shape {tuple(value.shape)}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name}: empty feature matrix, shape {tuple(value.shape)}")
    value = value.detach().to(device if device is not None else value.device, torch.float32)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return value


def _int_arg(name: str, value, lo: int, hi: int, why: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value}: expected {lo} <= {name} <= {hi}; {why}")
    return value


def _normalised_distances(feat: torch.Tensor) -> np.ndarray:
    """Squared Euclidean distances over all samples, row i divided by the largest distance to sample i.

    Computed as |x|^2 + |y|^2 - 2 x.y in float32 with the same operations as the reference so that the
    neighbour ranking sees the same rounding (its diagonal is ~1e-7, not exactly 0, and that decides
    where near-duplicates rank).
    """
    n = feat.shape[0]
    sq = feat.pow(2).sum(dim=1, keepdim=True)
    dist = sq.expand(n, n) + sq.expand(n, n).t()
    dist.addmm_(feat, feat.t(), beta=1, alpha=-2)
    dist = dist.cpu().numpy()
    scale = dist.max(axis=0)
    if not (scale > 0).all():
        raise ValueError("query, gallery: every sample is at distance 0 from all others (identical features); "
                         "the normalised distance is undefined")
    # The reference divides column j by its maximum and then transposes; dividing the transposed rows
    # gives the same float32 quotients (d[j, i] / max_x d[x, i]) with contiguous rows for the sort.
    out = np.ascontiguousarray(dist.T)
    del dist
    out /= scale[:, None]
    return out


def _nearest(dist: np.ndarray, width: int) -> np.ndarray:
    """The first `width` columns of each row's argsort (NumPy's default kind, as the reference).

    Rows whose `width + 1` smallest distances are all distinct have one possible order, found from a
    partition and a sort of that head alone. A row with an exact tie there (duplicate features put one
    at the top of the row) is sorted in full, because which of the tied entries comes first, and so
    which side of a cut-off it lands on, is whatever the full argsort does, and the reference's choice
    is what we reproduce.
    """
    rows, cols = dist.shape
    width = min(width, cols)
    rank = np.empty((rows, width), np.int64)
    step = max(1, _SORT_CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = dist[start:start + step]
        if width == cols:
            rank[start:start + step] = np.argsort(block, axis=1)
            continue
        head = np.argpartition(block, width, axis=1)[:, :width + 1]
        head_dist = np.take_along_axis(block, head, axis=1)
        order = np.argsort(head_dist, axis=1)
        head = np.take_along_axis(head, order, axis=1)
        tied = (np.diff(np.take_along_axis(head_dist, order, axis=1), axis=1) == 0).any(axis=1)
        if tied.any():
            head[tied] = np.argsort(block[tied], axis=1)[:, :width + 1]
        rank[start:start + step] = head[:, :width]
    return rank


def _reciprocal(top: np.ndarray) -> np.ndarray:
    """mask[i, a]: sample i is itself among the first top.shape[1] neighbours of its neighbour top[i, a]."""
    return (top[top] == np.arange(top.shape[0])[:, None, None]).any(axis=2)


def _expanded_sets(rank: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every member of every sample's expanded k-reciprocal set, sorted by row then column."""
    n = rank.shape[0]
    top = rank[:, :k1 + 1]
    member = _reciprocal(top)
    # round() is round-half-to-even like the reference's np.around: k1 = 5 gives 2, k1 = 7 gives 4.
    half = rank[:, :round(k1 / 2) + 1]
    half_member = _reciprocal(half)
    half_size = half_member.sum(axis=1)

    # Sorted keys i * n + j of the k-reciprocal sets: a membership test for many (i, j) at once.
    i_r, a_r = np.nonzero(member)
    keys = np.sort(i_r * n + top[i_r, a_r])
    if keys.shape[0] == 0:  # no sample has a reciprocal neighbour (massively duplicated features)
        return keys, keys
    # For each sample i and each candidate c = top[i, a]: c's half-size set, and which of it lies in i's set.
    cand_set = half[top]  # (n, k1 + 1, k1/2 + 1)
    cand_ok = half_member[top]
    probe = np.arange(n)[:, None, None] * n + cand_set
    pos = np.minimum(np.searchsorted(keys, probe), keys.shape[0] - 1)
    shared = (cand_ok & (keys[pos] == probe)).sum(axis=2)
    # A candidate's set is added when more than 2/3 of it already lies in i's set (the paper's rule,
    # written as the reference writes it).
    accept = member & (shared > 2 / 3 * half_size[top])

    i_e, a_e, b_e = np.nonzero(accept[:, :, None] & cand_ok)
    keys = np.unique(np.concatenate([keys, i_e * n + cand_set[i_e, a_e, b_e]]))
    return np.divmod(keys, n)


def _indptr(row: np.ndarray, n: int) -> np.ndarray:
    """Start of each row's entries in row-sorted lists (CSR row pointer)."""
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    return indptr


def _gather_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry positions of the CSR rows `rows`, concatenated, and which element of `rows` each came from."""
    count = indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(rows.shape[0]), count)
    within = np.arange(owner.shape[0]) - np.repeat(np.cumsum(count) - count, count)
    return indptr[rows][owner] + within, owner


def _expand_queries(neighbours: np.ndarray, indptr, col, weight, n):
    """Rows of V averaged over each sample's k2 nearest neighbours (itself included), still sparse."""
    k2 = neighbours.shape[1]
    entry, owner = _gather_rows(indptr, neighbours.reshape(-1))
    keys, inverse = np.unique((owner // k2) * n + col[entry], return_inverse=True)
    summed = np.bincount(inverse, weights=weight[entry], minlength=keys.shape[0])
    row, col = np.divmod(keys, n)
    return row, col, summed / k2


def _min_overlap(indptr, col, weight, num_q: int, n: int) -> np.ndarray:
    """(Q, G) sum over columns of min(V[query], V[gallery]).

    Both encodings are non-negative, so only columns where both are non-zero contribute: a join of
    the query rows' entries with the gallery rows' entries on the column, in query chunks that keep
    the number of pairs bounded.
    """
    num_g = n - num_q
    g_first = indptr[num_q]
    g_col = col[g_first:]
    by_col = np.argsort(g_col, kind="stable")
    g_row = np.repeat(np.arange(num_g), np.diff(indptr[num_q:]))[by_col]
    g_weight = weight[g_first:][by_col]
    g_ptr = _indptr(g_col[by_col], n)  # gallery entries of column k: g_ptr[k]:g_ptr[k + 1]

    q_col, q_weight = col[:g_first], weight[:g_first]
    q_row = np.repeat(np.arange(num_q), np.diff(indptr[:num_q + 1]))
    pairs = g_ptr[q_col + 1] - g_ptr[q_col]  # gallery partners of each query entry
    pairs_before_row = np.concatenate([[0], np.cumsum(pairs)])[indptr[:num_q + 1]]
    out = np.empty((num_q, num_g))
    start = 0
    while start < num_q:
        # The largest run of query rows within the pair budget (at least one row, however large).
        stop = int(np.searchsorted(pairs_before_row, pairs_before_row[start] + _JOIN_CHUNK_PAIRS, "right")) - 1
        stop = min(max(stop, start + 1), num_q)
        entries = slice(indptr[start], indptr[stop])
        count = pairs[entries]
        # Per-entry quantities are repeated once per partner rather than gathered through an owner
        # index: the pair arrays are the large ones, so each pass over them counts.
        first_pair = np.cumsum(count) - count
        partner = np.arange(int(count.sum())) + np.repeat(g_ptr[q_col[entries]] - first_pair, count)
        cell = np.repeat((q_row[entries] - start) * num_g, count) + g_row[partner]
        value = np.minimum(np.repeat(q_weight[entries], count), g_weight[partner])
        out[start:stop] = np.bincount(cell, weights=value, minlength=(stop - start) * num_g).reshape(-1, num_g)
        start = stop
    return out
