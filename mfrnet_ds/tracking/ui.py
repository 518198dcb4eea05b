"""`python -m mfrnet_ds.tracking.ui OUT_DIR [--port 5000]`: the MLflow UI over a run folder, wherever it is now.

Starts `mlflow server` over OUT_DIR/mlflow.db with OUT_DIR/mlartifacts as the artifact destination (so a
moved or copied folder still shows its artifacts, see tracking/store.py) and prints the links that land
on the runs table and on a compare page. MLflow 3 opens an experiment on its GenAI overview unless the
link names the workflow: `?workflowType=machine_learning` (the UI's own "Model training" toggle).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

from mfrnet_ds.tracking.store import ARTIFACT_DIR, DB_NAME, sqlite_uri


def server_command(out_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` command line for a run folder (one worker: the UI is for one person)."""
    out = Path(out_dir).resolve()
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow if mlflow.exists() else "mlflow"), "server", "--backend-store-uri",
            sqlite_uri(out), "--artifacts-destination", str(out / ARTIFACT_DIR),
            "--host", host, "--port", str(port), "--workers", "1"]


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table (not the GenAI overview MLflow 3 opens by default)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page, in the "Model training" workflow (its side bar leads back to the runs table)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page for the given runs of one experiment."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([str(experiment_id)], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def experiment_links(out_dir, base: str) -> list[str]:
    """One line per experiment of the store with runs: its name, runs-table link and compare link."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri(out_dir))
    lines = []
    for experiment in client.search_experiments():
        runs = client.search_runs([experiment.experiment_id], max_results=20)
        if runs:
            lines.append(f"{experiment.name}: runs {runs_url(base, experiment.experiment_id)}")
            if len(runs) > 1:
                lines.append(f"  compare {compare_url(base, experiment.experiment_id, [r.info.run_id for r in runs])}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="run folder holding mlflow.db and mlartifacts/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if not (args.out_dir / DB_NAME).is_file():
        print(f"error: {args.out_dir / DB_NAME} does not exist: expected a run folder (train.out_dir) with an "
              "MLflow sqlite store", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    for line in experiment_links(args.out_dir, base):
        print(line, flush=True)
    command = server_command(args.out_dir, args.host, args.port)
    os.execvp(command[0], command)   # this process becomes the server: stopping it stops the UI


if __name__ == "__main__":
    sys.exit(main())
