"""Metric histories read back from an MLflow store, in the trainer's units under the flat names."""
from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from mfrnet_ds.tracking.names import flat_key, from_mlflow


def fetch_histories(client, keys_per_run: dict[str, list[str]]):
    """{run_id: {flat key: (steps, values in the trainer's units)}} of the MLflow metric names in
    keys_per_run (new or old names alike), with a progress bar over the metric histories."""
    jobs = [(run_id, key) for run_id, keys in keys_per_run.items() for key in keys]
    histories: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for run_id, key in tqdm(jobs, desc="metric histories", unit="metric", file=sys.stderr, leave=False):
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        latest = {m.step: from_mlflow(key, m.value)[1] for m in points}  # a step logged twice: the last value
        steps = np.array(sorted(latest), dtype=np.int64)
        histories[run_id][flat_key(key)] = (steps, np.array([latest[s] for s in steps], dtype=np.float64))
    return histories
