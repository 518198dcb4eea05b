"""Benchmark: vectorised `evaluate_rank` against the classic per-query loop, in the same run.

    python bench/eval.py            # 2,000 and 10,000 queries x 10,000 gallery
    python bench/eval.py --quick    # 200 and 1,000 queries x 10,000 gallery

Embeddings are random but identity-structured (one centre per id plus noise, L2-normalised), so the
metrics are neither trivial nor degenerate; the distance is squared Euclidean in float32, as the
evaluation computes it. Each implementation runs `--repeat` times and the best time is reported;
the results must be bit-identical. Target: vectorised <= 1/10 of the loop's time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from mfrnet_ds.eval.metrics import evaluate_rank, evaluate_rank_loop


def make_problem(num_query: int, num_gallery: int, num_ids: int, num_cams: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)

    def draw(n):
        pids = rng.integers(0, num_ids, n)
        feats = centres[pids] + 2.0 * rng.standard_normal((n, dim)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        return feats, pids, rng.integers(0, num_cams, n)

    qf, q_pids, q_cams = draw(num_query)
    gf, g_pids, g_cams = draw(num_gallery)
    distmat = np.float32(2.0) - np.float32(2.0) * (qf @ gf.T)  # |q - g|^2 of unit vectors
    return distmat, q_pids, g_pids, q_cams, g_cams


def best_time(fn, args, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds instead of a minute)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per implementation; best time kept")
    parser.add_argument("--ids", type=int, default=200)
    parser.add_argument("--cams", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [(200, 10_000), (1_000, 10_000)] if args.quick else [(2_000, 10_000), (10_000, 10_000)]

    print(f"# evaluate_rank vs classic loop | numpy {np.__version__} | python {platform.python_version()} | "
          f"{platform.machine()} {os.cpu_count()} cpus | {args.ids} ids, {args.cams} cams, dim {args.dim}")
    header = f"{'queries':>8} {'gallery':>8} {'loop s':>9} {'vector s':>9} {'ratio':>7} {'speed-up':>9} " \
             f"{'identical':>9} {'mAP %':>7} {'R1 %':>6}"
    print(header)
    print("-" * len(header))
    all_ok = True
    for num_query, num_gallery in sizes:
        problem = make_problem(num_query, num_gallery, args.ids, args.cams, args.dim, args.seed)
        t_loop, (cmc_loop, map_loop) = best_time(evaluate_rank_loop, problem, args.repeat)
        t_vec, (cmc_vec, map_vec) = best_time(evaluate_rank, problem, args.repeat)
        identical = bool(np.array_equal(cmc_loop, cmc_vec) and cmc_loop.dtype == cmc_vec.dtype
                         and map_loop == map_vec)
        ratio = t_vec / t_loop
        all_ok &= identical and ratio <= 0.1
        print(f"{num_query:>8} {num_gallery:>8} {t_loop:>9.3f} {t_vec:>9.3f} {ratio:>7.3f} {1 / ratio:>8.1f}x "
              f"{str(identical):>9} {100 * map_vec:>7.2f} {100 * cmc_vec[0]:>6.2f}")
        sys.stdout.flush()
    print("target (ratio <= 0.100, identical):", "met" if all_ok else "NOT met")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
