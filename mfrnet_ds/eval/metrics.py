"""CMC and mAP for re-identification, with the contract of torchreid's / fast-reid's `evaluate_rank`.

For each query the gallery is ranked by distance (ties broken by gallery index: a stable sort);
gallery entries with the query's id AND the query's camera are removed (MSVR310 passes scene ids in
the camera slots); a query with no true match left is skipped; CMC is averaged over the remaining
("valid") queries and mAP is the mean of their average precisions.

`evaluate_rank_loop` is the classic per-query loop of the reference code, kept as the reference.
`evaluate_rank` returns bit-identical numbers without sorting the gallery at all:

* Only the ranks of the query's true matches (the "thresholds") matter. The rank of a match is the
  number of kept gallery entries whose key (distance, index) is smaller than its own.
* Each row's distances are mapped to integer cells by `trunc(min((d - row_min) * scale, top))`,
  the scale spreading the cells over [row minimum, the row's last match]. IEEE subtraction,
  multiplication, min and truncation are monotone, so an entry in a lower cell than a threshold has
  a strictly smaller distance, and one in a higher cell a strictly larger one. Equal distances
  always share a cell, so ties are decided only where the exact comparison happens.
* A per-row lookup table gives, for each cell holding no threshold, how many thresholds lie below
  it. One gather and one bincount then count, for every threshold, the entries ranked before it.
  Entries in a cell that holds a threshold are compared exactly (binary search on the key).
* Same-id entries (matches and removed ones) are few and handled explicitly from a grouping of the
  gallery by id, so no full-size comparison of ids is needed.
* Each AP is summed over a zero vector of the kept length with the precisions at the hit
  positions, exactly the vector the loop sums, so numpy's pairwise summation rounds identically.
* When most distances are tied (few distinct values) the cells cannot separate them; such a chunk
  is ranked by a stable sort instead (about the loop's speed, same numbers).
"""

from __future__ import annotations

import warnings

import numpy as np

# Cells per gallery entry: fewer cells make the lookup table cheaper to build, more make fewer
# entries share a cell with a threshold (those need the exact comparison). 1/4 to 1/2 measured best.
_CELLS_PER_ENTRY = 0.5
_MAX_CELLS = 1 << 20
# Rows per chunk are chosen so one chunk holds about this many distances: the temporaries (~25 bytes
# per distance) then stay in cache; at 4x this size the same work measured 2-3x slower.
_CHUNK_ELEMENTS = 1 << 18
_HISTOGRAM_COPIES = 4
# Above this fraction of entries needing the exact comparison (distances with few distinct values,
# e.g. a collapsed model), a stable sort of the chunk is cheaper than the cell path.
_EXACT_FRACTION_MAX = 0.25


def _to_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()  # exact, order-preserving; numpy has no bfloat16
        value = value.numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name}: cannot convert {type(value).__name__} to a numpy array") from exc


def _prepare(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Validate and convert the inputs shared by both implementations."""
    distmat = _to_numpy("distmat", distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D (num_query, num_gallery) array, got shape {distmat.shape}")
    if distmat.dtype == np.float16:
        distmat = distmat.astype(np.float32)  # exact; numpy's float16 arithmetic is slow
    elif distmat.dtype.kind in "iu":
        distmat = distmat.astype(np.float64)
    elif distmat.dtype not in (np.float32, np.float64):
        raise TypeError(f"distmat: expected a float or integer array, got dtype {distmat.dtype}")
    num_q, num_g = distmat.shape
    arrays = []
    for name, value, size, side in (("q_pids", q_pids, num_q, "query"), ("g_pids", g_pids, num_g, "gallery"),
                                    ("q_camids", q_camids, num_q, "query"),
                                    ("g_camids", g_camids, num_g, "gallery")):
        arr = _to_numpy(name, value)
        if arr.shape != (size,):
            raise ValueError(f"{name}: expected shape ({size},) to match the distmat's {side} axis "
                             f"(distmat shape {distmat.shape}), got {arr.shape}")
        arrays.append(arr)
    if num_g == 0:
        raise ValueError("distmat: the gallery is empty (0 columns)")
    max_rank = int(max_rank)
    if max_rank < 1:
        raise ValueError(f"max_rank: expected >= 1, got {max_rank}")
    if num_g < max_rank:
        warnings.warn(f"number of gallery samples ({num_g}) is smaller than max_rank ({max_rank}); "
                      f"using max_rank={num_g}", stacklevel=3)
        max_rank = num_g
    return (np.ascontiguousarray(distmat), *arrays, max_rank)


def _no_valid_query() -> ValueError:
    return ValueError("no valid query: no query has a true match in the gallery once entries with the "
                      "same id and camera (scene for MSVR310) are removed")


def _non_finite(rows) -> ValueError:
    return ValueError(f"distmat: non-finite distances (NaN or inf) in query rows {[int(r) for r in rows][:10]}; "
                      "embeddings are probably broken")


def evaluate_rank_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The classic per-query evaluation (reference code / torchreid), with a stable sort.

    One departure from the classic code: when a query keeps fewer than `max_rank` gallery entries its
    CMC row is padded with ones (it has a match, so it stays matched), where the classic code would
    fail on the ragged rows.
    """
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank = _prepare(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    finite = np.isfinite(distmat).all(axis=1)
    if not finite.all():
        raise _non_finite(np.flatnonzero(~finite))
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    num_valid_q = 0.0
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        keep = np.invert(remove)
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        cmc = cmc[:max_rank]
        if cmc.shape[0] < max_rank:
            cmc = np.concatenate([cmc, np.ones(max_rank - cmc.shape[0], dtype=cmc.dtype)])
        all_cmc.append(cmc)
        num_valid_q += 1.0
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum()
        y = np.arange(1, tmp_cmc.shape[0] + 1) * 1.0
        tmp_cmc = tmp_cmc / y
        tmp_cmc = np.asarray(tmp_cmc) * orig_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    if num_valid_q == 0:
        raise _no_valid_query()
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    return all_cmc.sum(0) / num_valid_q, float(np.mean(all_ap))


class _GalleryById:
    """The gallery grouped by id, so a chunk of queries finds its same-id entries without a scan."""

    def __init__(self, g_pids: np.ndarray):
        self.order = np.argsort(g_pids, kind="stable")  # within an id: ascending gallery index
        self.ids, self.start, self.count = np.unique(g_pids[self.order], return_index=True, return_counts=True)

    def same_id(self, q_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, gallery column) of every gallery entry sharing the id of query row `row`."""
        pos = np.searchsorted(self.ids, q_pids)
        pos_c = np.minimum(pos, len(self.ids) - 1)
        found = (pos < len(self.ids)) & (self.ids[pos_c] == q_pids)
        count = np.where(found, self.count[pos_c], 0)
        rows = np.repeat(np.arange(len(q_pids)), count)
        within = np.arange(rows.shape[0]) - np.repeat(np.cumsum(count) - count, count)
        cols = self.order[np.repeat(self.start[pos_c], count) + within]
        return rows, cols


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, *, chunk_rows=None):
    """CMC (float32, length max_rank) and mAP of a query x gallery distance matrix.

    Inputs may be numpy arrays or torch tensors. Bit-identical to `evaluate_rank_loop`.
    `chunk_rows` (queries per chunk) bounds memory; by default about 256K distances per chunk.
    Raises ValueError when no query has a true match left, or on NaN/inf distances.
    """
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank = _prepare(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    num_q, num_g = distmat.shape
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // num_g)
    gallery = _GalleryById(g_pids)
    ap_buffer = np.zeros(min(chunk_rows, num_q) * num_g)  # stays all-zero between chunks
    first_hits, aps = [], []
    for start in range(0, num_q, chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, num_q))
        first, ap = _chunk_ranks(distmat, rows, q_pids, q_camids, g_camids, gallery, ap_buffer)
        first_hits.append(first)
        aps.append(ap)
    first_hit = np.concatenate(first_hits) if first_hits else np.zeros(0, np.int64)
    if first_hit.shape[0] == 0:
        raise _no_valid_query()
    hist = np.bincount(np.minimum(first_hit, max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hist).astype(np.float32) / float(first_hit.shape[0])
    return cmc, float(np.mean(np.concatenate(aps)))


def _chunk_ranks(distmat, rows, q_pids, q_camids, g_camids, gallery, ap_buffer):
    """First-hit rank and AP of every valid query among `rows`, in query order."""
    num_g = distmat.shape[1]
    s_row, s_col = gallery.same_id(q_pids[rows])
    removed = g_camids[s_col] == q_camids[rows][s_row]
    match_count = np.bincount(s_row[~removed], minlength=rows.shape[0])
    valid = match_count > 0
    skipped = rows[~valid]
    if skipped.shape[0] and not np.isfinite(distmat[skipped]).all():  # the loop rejects them too
        raise _non_finite(skipped[~np.isfinite(distmat[skipped]).all(axis=1)])
    if not valid.any():
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    if not valid.all():  # drop queries without a match before the full-size work
        new_index = np.cumsum(valid) - 1
        keep_item = valid[s_row]
        s_row, s_col, removed = new_index[s_row[keep_item]], s_col[keep_item], removed[keep_item]
        rows, match_count = rows[valid], match_count[valid]
    dist = distmat[rows[0]:rows[-1] + 1] if rows[-1] - rows[0] + 1 == rows.shape[0] else distmat[rows]
    n_rows = rows.shape[0]
    lo, hi = dist.min(axis=1), dist.max(axis=1)  # NaN and inf show up here
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        raise _non_finite(rows[bad])

    # Same-id entries in ranking order (row, then distance, then index: the stable sort's order).
    s_val = dist[s_row, s_col]
    order = np.lexsort((s_col, s_val, s_row))
    s_row, s_col, s_val, removed = s_row[order], s_col[order], s_val[order], removed[order]
    removed_before = np.cumsum(removed) - removed  # removed entries ranked before each same-id entry
    removed_per_row = np.bincount(s_row[removed], minlength=n_rows)
    removed_before -= (np.cumsum(removed_per_row) - removed_per_row)[s_row]
    hit = ~removed
    t_row, t_col, t_val, t_removed_before = s_row[hit], s_col[hit], s_val[hit], removed_before[hit]
    t_first = np.cumsum(match_count) - match_count  # index of each row's first threshold

    below = _entries_below_thresholds(dist, lo, hi, t_row, t_col, t_val, t_first, match_count)
    t_index = np.arange(t_row.shape[0]) - t_first[t_row]  # 0-based hit number within the row
    rank = below - t_removed_before  # position among the kept entries
    return rank[t_first], _average_precisions(rank, t_index, t_row, match_count, num_g - removed_per_row,
                                              ap_buffer)


def _entries_below_thresholds(dist, lo, hi, t_row, t_col, t_val, t_first, match_count):
    """For every threshold: how many gallery entries of its row have a smaller (distance, index).

    `lo`, `hi`: each row's minimum and maximum distance (finite).
    """
    n_rows, num_g = dist.shape
    n_cells = int(min(_MAX_CELLS, max(1, num_g * _CELLS_PER_ENTRY)))
    width = n_cells + 2  # cells 0..n_cells cover [row min, last threshold]; n_cells + 1: beyond it
    t_last = t_val[t_first + match_count - 1]  # thresholds are sorted: the row's largest
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # Only the range up to the last threshold needs resolution: everything beyond it is counted
        # after every threshold, so a far outlier does not squeeze the useful cells together.
        span = np.where(t_last > lo, t_last - lo, hi - lo)
        usable = np.isfinite(span) & (span > 0)
        # A flat or overflowing row puts every entry in cell 0: still exact, only slower.
        scale = np.where(usable, dist.dtype.type(n_cells) / np.where(usable, span, 1), 0).astype(dist.dtype)
        lo = np.where(usable, lo, 0).astype(dist.dtype)

    def cells(values, row):  # the same operations for entries and thresholds: identical rounding
        out = np.subtract(values, lo[row])
        out *= scale[row]
        np.minimum(out, n_cells + 1, out=out)  # monotone too; also keeps the int cast in range
        return out.astype(np.intp)

    row_offset = np.arange(n_rows) * width
    t_cell = cells(t_val, t_row) + row_offset[t_row]
    per_cell = np.bincount(t_cell, minlength=n_rows * width)
    before_cell = np.cumsum(per_cell) - per_cell  # thresholds (all rows) before each cell
    # Bins: row r owns bins t_first[r] + r ... t_first[r] + r + match_count[r] (position 0..m).
    lut = before_cell.reshape(n_rows, width) + np.arange(n_rows)[:, None]
    n_bins = int(match_count.sum()) + n_rows
    lut = lut.reshape(-1)
    lut[t_cell] = n_bins  # cells holding a threshold: compared exactly below

    entry_cell = cells(dist, np.arange(n_rows)[:, None])  # (rows, gallery)
    entry_cell += row_offset[:, None]
    entry_bin = lut.take(entry_cell)  # (rows, gallery)
    exact = np.flatnonzero(entry_bin == n_bins)
    if exact.shape[0] > _EXACT_FRACTION_MAX * entry_bin.size:  # mostly tied distances: sort instead
        return _entries_below_by_sort(dist, t_row, t_col)
    # Neighbouring columns count into separate copies of the histogram: consecutive increments of
    # one counter stall the CPU; this measured ~2x faster than one histogram.
    entry_bin += (np.arange(num_g) % _HISTOGRAM_COPIES) * (n_bins + 1)
    counts = np.bincount(entry_bin.reshape(-1), minlength=_HISTOGRAM_COPIES * (n_bins + 1))
    counts = counts.reshape(_HISTOGRAM_COPIES, n_bins + 1).sum(axis=0)[:n_bins]

    counts += _exact_bins(dist, exact, entry_cell.reshape(-1)[exact], before_cell, per_cell, t_val, t_col, n_bins)

    # counts[bin of (r, p)] = entries with exactly p thresholds of row r before them. Entries before
    # threshold j are those with p <= j, less the threshold itself.
    cum = np.cumsum(counts)
    row_bin0 = t_first + np.arange(n_rows)
    row_base = cum[row_bin0] - counts[row_bin0]
    t_bin = np.arange(t_row.shape[0]) + t_row
    return cum[t_bin] - row_base[t_row] - 1


def _exact_bins(dist, exact, e_cell, before_cell, per_cell, t_val, t_col, n_bins: int):
    """Bin counts of the entries that share a cell with a threshold: each one's position among its cell's
    thresholds by a vectorised binary search on (distance, index)."""
    e_row, e_col = np.divmod(exact, dist.shape[1])
    e_val = dist[e_row, e_col]
    left = before_cell[e_cell]  # thresholds of this cell: global indices [left, right)
    right = left + per_cell[e_cell]
    while True:
        active = left < right
        if not active.any():
            break
        mid = (left + right) // 2
        mid_c = np.where(active, mid, 0)
        less = (t_val[mid_c] < e_val) | ((t_val[mid_c] == e_val) & (t_col[mid_c] < e_col))
        left = np.where(active & less, mid + 1, left)
        right = np.where(active & ~less, mid, right)
    return np.bincount(left + e_row, minlength=n_bins)


def _entries_below_by_sort(dist, t_row, t_col):
    """The same counts from a stable sort of each row: its position is the count of smaller keys."""
    order = np.argsort(dist, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(dist.shape[1])[None, :], axis=1)
    return position[t_row, t_col]


def _average_precisions(rank, hit_number, t_row, match_count, kept_length, buf):
    """AP per row, summed over the same zero-padded precision vector the classic loop builds.

    Rows are laid out in `buf` (all zeros) sorted by kept length, so the rows of one length form a
    contiguous (rows, length) block that numpy reduces row by row with the loop's pairwise order.
    """
    precision = (hit_number + 1) / (rank + 1)
    by_length = np.argsort(kept_length, kind="stable")
    length_sorted = kept_length[by_length]
    start_sorted = np.cumsum(length_sorted) - length_sorted
    start = np.empty_like(start_sorted)
    start[by_length] = start_sorted
    pos = start[t_row] + rank
    buf[pos] = precision
    ap_sum = np.empty(match_count.shape[0])
    group_start = np.flatnonzero(np.diff(length_sorted, prepend=-1))
    for a, b in zip(group_start, [*group_start[1:], length_sorted.shape[0]]):
        length = int(length_sorted[a])
        block = buf[start_sorted[a]:start_sorted[a] + (b - a) * length].reshape(b - a, length)
        ap_sum[by_length[a:b]] = block.sum(axis=1)
    buf[pos] = 0.0
    return ap_sum / match_count
