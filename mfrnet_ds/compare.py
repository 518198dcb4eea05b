"""Compare training runs of one MLflow experiment: a table, learning curves, expert-load heat maps.

    python -m mfrnet_ds.compare --experiment rgbnt201 [--runs ID ...] [--metric mAP loss ...]
                                [--out DIR] [--uri URI] [--log]

The table lists each run with the params that differ between the runs, best mAP / R1 (over all
evaluations, percent), the last samples_per_s, and the parameter count / expert counts. PNGs in
--out: `curve_<metric>.png` (one line per run) and `expert_load_<run>.png` (per run: steps x experts
for every layer, from the metrics `moe/<layer>/expert_<e>_share`). `--log` records the comparison
(table and PNGs) as artifacts of a run in its own experiment `<experiment>-comparisons`, never
among the training runs.

Metric names: training logs eval/mAP (a fraction), train/loss, moe/... (mfrnet_ds/tracking/names.py);
runs written before that logged the flat names (mAP in percent, loss, expert_load/...). Both are read
and shown in the trainer's units under the flat names; --metric takes either form.

Store: --uri, else MLFLOW_TRACKING_URI, else ./mlflow.db. See the runs in a browser with
`python -m mfrnet_ds.tracking.ui STORE_DIR` (it prints the runs-table and compare links).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mfrnet_ds.tracking import store as _store  # noqa: E402
from mfrnet_ds.tracking.history import fetch_histories  # noqa: E402
from mfrnet_ds.tracking.names import flat_key  # noqa: E402
from mfrnet_ds.tracking.plots import EXPERT_LOAD, expert_load_matrices, plot_expert_load, safe_name  # noqa: E402,F401

_store.install()  # the store's portable artifact locations (mlflow-artifacts:/...) resolve beside it

COMPARISON_TAG = "mfrnet.kind"  # runs written by --log carry "comparison" and are never compared


class CompareError(Exception):
    """A problem with the user's request (store, experiment, run ids, metric names)."""


def resolve_uri(uri: str | None) -> str:
    """The store the trainer's rule gives (tracking/store.py) with the current folder as the run folder; a
    default sqlite file that is not there is an error, not a new empty store."""
    resolved = _store.resolve_tracking_uri(uri, Path.cwd())
    default = _store.sqlite_path(resolved)
    if not uri and not os.environ.get("MLFLOW_TRACKING_URI") and not default.exists():
        raise CompareError(f"no MLflow store given and {default.resolve()} does not exist; pass --uri "
                           "sqlite:///PATH/mlflow.db (the training's out_dir) or set MLFLOW_TRACKING_URI")
    return resolved


def load_runs(client: MlflowClient, experiment: str | None, run_ids: list[str] | None) -> tuple[str, pd.DataFrame]:
    """(experiment name, runs DataFrame as from mlflow.search_runs), comparison runs left out."""
    experiments = client.search_experiments()
    if experiment is None:
        names = [e.name for e in experiments if not e.name.endswith("-comparisons")
                 and client.search_runs([e.experiment_id], max_results=1)]
        if len(names) != 1:
            raise CompareError(f"--experiment is needed: the store has runs in {names or 'no experiment'}")
        experiment = names[0]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"experiment {experiment!r} not found; the store has "
                           f"{sorted(e.name for e in experiments)}")
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], order_by=["attributes.start_time ASC"])
    if f"tags.{COMPARISON_TAG}" in runs.columns:
        runs = runs[runs[f"tags.{COMPARISON_TAG}"] != "comparison"]
    if run_ids:
        missing = [r for r in run_ids if r not in set(runs["run_id"])]
        if missing:
            raise CompareError(f"run ids not in experiment {experiment!r}: {missing}")
        runs = runs.set_index("run_id").loc[run_ids].reset_index()
    if runs.empty:
        raise CompareError(f"experiment {experiment!r} has no runs to compare")
    return experiment, runs.reset_index(drop=True)


def run_label(row) -> str:
    name = row.get("tags.mlflow.runName")
    return f"{name if isinstance(name, str) and name else 'run'}-{row['run_id'][:6]}"


def metric_column(runs: pd.DataFrame, key: str) -> pd.Series:
    """The latest value of a flat key per run, from the new name or the old one (trainer's units)."""
    from mfrnet_ds.tracking.names import mlflow_metrics

    ((name, scale),) = [(n, v) for n, v in mlflow_metrics({key: 1.0}).items()]
    new = runs.get(f"metrics.{name}", pd.Series(np.nan, index=runs.index)) / scale
    old = runs.get(f"metrics.{key}", pd.Series(np.nan, index=runs.index)) if name != key else new
    return new.fillna(old)


def build_table(runs: pd.DataFrame, histories) -> pd.DataFrame:
    params = sorted(c for c in runs.columns if c.startswith("params."))  # mlflow's column order varies
    differing = [c for c in params if runs[c].astype(str).nunique(dropna=False) > 1] if len(runs) > 1 else []
    size_cols = [c for c in params if c == "params.num_params" or c.endswith("num_experts")]
    table = pd.DataFrame({"run": [run_label(row) for _, row in runs.iterrows()],
                          "status": runs["status"].values})
    for column in differing + [c for c in size_cols if c not in differing]:
        table[column[len("params."):]] = runs[column].fillna("-").values
    for metric in ("mAP", "R1"):  # percent, as the trainer prints them
        best = []
        for run_id in runs["run_id"]:
            values = histories.get(run_id, {}).get(metric, (None, np.zeros(0)))[1]
            best.append(float(np.nanmax(values)) if values.size else np.nan)
        table[f"best {metric}"] = best
    table["samples/s"] = metric_column(runs, "samples_per_s").values
    return table


def plot_curves(runs: pd.DataFrame, histories, metric: str, out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    plotted = 0
    for _, row in runs.iterrows():
        steps, values = histories.get(row["run_id"], {}).get(metric, (np.zeros(0), np.zeros(0)))
        if steps.size:
            ax.plot(steps, values, marker="o" if steps.size < 20 else None, ms=3, label=run_label(row))
            plotted += 1
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"curve_{safe_name(metric)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_experiment(client: MlflowClient, experiment: str, uri: str) -> str:
    """Id of `<experiment>-comparisons`: comparison runs live there, not among the training runs."""
    from mfrnet_ds.tracking.client import ensure_experiment

    return ensure_experiment(client, f"{experiment}-comparisons", uri,
                             f"Comparisons of runs of `{experiment}` written by `python -m mfrnet_ds.compare --log`.")


def compare(experiment: str | None, run_ids: list[str] | None, metrics: list[str], out: Path | None, uri: str,
            log: bool = False):
    """Build the table and the plots; returns (experiment, table text, out dir, PNG paths, logged run id)."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment, runs = load_runs(client, experiment, run_ids)
    metrics = [flat_key(m) for m in metrics]   # "eval/mAP" or "mAP": the same curve
    keys_per_run = {}
    for _, row in runs.iterrows():
        logged = {c[len("metrics."):] for c in runs.columns if c.startswith("metrics.") and pd.notna(row[c])}
        wanted = set(metrics) | {"mAP", "R1"}
        keys_per_run[row["run_id"]] = sorted(k for k in logged
                                             if flat_key(k) in wanted or EXPERT_LOAD.match(flat_key(k)))
    histories = fetch_histories(client, keys_per_run)
    table = build_table(runs, histories)

    if out is None:
        base = Path(uri[len("sqlite:///"):]).parent / "compare" if uri.startswith("sqlite:///") else Path("compare_out")
        out = base / safe_name(experiment)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [p for m in metrics if (p := plot_curves(runs, histories, m, out)) is not None]
    for _, row in runs.iterrows():
        layers = expert_load_matrices(histories.get(row["run_id"], {}))
        if layers:
            pngs.append(plot_expert_load(run_label(row), layers, out))
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")
    (out / "compare.txt").write_text(f"experiment: {experiment}\n{text}\n")
    table.to_csv(out / "compare.csv", index=False)

    logged_run = None
    if log:
        experiment_id = comparison_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=f"compare {len(runs)} runs {time.strftime('%m%d-%H%M%S')}",
                                tags={COMPARISON_TAG: "comparison",
                                      "mfrnet.compared_runs": " ".join(runs["run_id"]),
                                      "mlflow.note.content": f"Comparison of {len(runs)} runs of `{experiment}`:\n\n"
                                                             f"```\n{text}\n```"})
        logged_run = run.info.run_id
        client.log_artifacts(logged_run, str(out), "comparison")
        client.set_terminated(logged_run)
    return experiment, text, out, pngs, logged_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="experiment name (default: the only one with runs)")
    parser.add_argument("--runs", nargs="+", metavar="ID", help="run ids (default: all runs of the experiment)")
    parser.add_argument("--metric", nargs="+", default=["mAP"], help="metrics to plot as learning curves")
    parser.add_argument("--out", type=Path, help="folder for the PNGs and the table (default: "
                        "<store dir>/compare/<experiment> for sqlite stores, else ./compare_out)")
    parser.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--log", action="store_true", help="log the comparison as the artifacts of a new run "
                        "in the experiment <experiment>-comparisons")
    args = parser.parse_args(argv)
    try:
        uri = resolve_uri(args.uri)
        experiment, text, out, pngs, logged_run = compare(args.experiment, args.runs, args.metric, args.out, uri,
                                                          args.log)
    except CompareError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(f"experiment: {experiment}   store: {uri}")
    print(text)
    print(f"\nplots ({len(pngs)}) in {out}:")
    for p in pngs:
        print(f"  {p.name}")
    if logged_run:
        print(f"comparison logged as run {logged_run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
