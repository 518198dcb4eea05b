"""Import an offline tracking log (JSONL) into an MLflow store.

    python -m mfrnet_ds.tracking.replay OUT/mlflow_offline.jsonl [--uri URI] [--force]

The store defaults to MLFLOW_TRACKING_URI, else the sqlite file next to the log (the tracker's own
default). A run the store already knows (the tracker lost the store mid-run) is continued in place;
otherwise a new run is created with the logged params and tags. Metrics keep their steps and
timestamps. A marker file `<log>.replayed` records how far the log was imported: running the
command again imports only what was appended since (--force imports everything again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
import warnings
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from mfrnet_ds.tracking.client import ensure_experiment, log_metrics_batched, log_params_batched, split_resumed_params
from mfrnet_ds.tracking.store import resolve_tracking_uri
from mfrnet_ds.tracking.offline import read_records


def _existing_run(client: MlflowClient, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def replay(path: str | Path, uri: str | None = None, force: bool = False, close_open_run: bool = True) -> list[str]:
    """Import the runs of the log not imported yet; returns the run ids written to. A run whose log has no
    end record yet is marked KILLED, unless `close_open_run` is False (the tracker replaying its own live
    run when the store is back)."""
    path = Path(path).resolve()
    marker = path.with_name(path.name + ".replayed")
    uri = resolve_tracking_uri(uri, path.parent)
    done = json.loads(marker.read_text()) if marker.exists() and not force else None
    if done and done["uri"] != uri:
        raise RuntimeError(f"{path} was imported into {done['uri']} up to line {done['lines']}; import the "
                           f"rest there, or pass --force to import all of it into {uri}")
    records = list(read_records(path, first_line=done["lines"] + 1 if done else 1))
    if not records:
        return []
    client = MlflowClient(uri)
    run_id = done["last_run_id"] if done and done["open"] else None  # the log grew inside that run
    if records[0][1]["type"] != "start" and run_id is None:
        raise ValueError(f"{path}:{records[0][0]}: expected a 'start' record, got {records[0][1]['type']!r}")
    run_ids: list[str] = [run_id] if run_id else []
    for _, record in tqdm(records, desc=f"replay {path.name}", unit="rec", disable=len(records) < 1000):
        kind = record["type"]
        if kind == "start":
            if run_id and run_id != record.get("run_id"):  # the previous writer died without closing its run
                client.set_terminated(run_id, status="KILLED")
            run_id = _start(client, uri, record)
            run_ids.append(run_id)
        elif kind == "params":
            new, _ = split_resumed_params(client.get_run(run_id).data.params, record["params"])
            log_params_batched(client, run_id, new)
        elif kind == "metrics":
            log_metrics_batched(client, run_id, record["metrics"], record["step"], record["timestamp"])
        elif kind == "artifact":
            source = Path(record["path"])
            if not source.exists():
                warnings.warn(f"{path}: artifact {source} no longer exists; skipped", stacklevel=2)
            elif source.is_dir():
                client.log_artifacts(run_id, str(source), record.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(source), record.get("artifact_path"))
        elif kind == "end":
            client.set_terminated(run_id, status=record["status"], end_time=record["timestamp"])
            run_id = None
    if run_id and close_open_run:  # no end record (yet): KILLED until a later import brings the real end
        client.set_terminated(run_id, status="KILLED")
    marker.write_text(json.dumps({"uri": uri, "lines": records[-1][0], "last_run_id": run_id or run_ids[-1],
                                  "open": run_id is not None,
                                  "run_ids": sorted(set((done or {}).get("run_ids", []) + run_ids)),
                                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return run_ids


def store_answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the store answers now: a tracking server's /health (one request, no retries), else one
    cheap query of a database store."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                return response.status == 200
        except OSError:
            return False
    try:
        MlflowClient(uri).search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001
        return False


def _start(client: MlflowClient, uri: str, record: dict) -> str:
    experiment_id = ensure_experiment(client, record["experiment"], uri)
    run = _existing_run(client, record.get("run_id"))
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        new, changed = split_resumed_params(run.data.params, record["params"])
        if changed:
            warnings.warn(f"run {run.info.run_id}: params differ from the store, kept the store's: "
                          f"{sorted(changed)}", stacklevel=3)
        log_params_batched(client, run.info.run_id, new, record.get("tags"))
        return run.info.run_id
    tags = dict(record.get("tags") or {})
    if record.get("run_id"):
        tags["mfrnet.offline_run_id"] = record["run_id"]  # the id it had in the unreachable store
    run_id = client.create_run(experiment_id, run_name=record["run_name"], tags=tags,
                               start_time=record.get("timestamp")).info.run_id
    log_params_batched(client, run_id, record["params"])
    return run_id


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="the offline JSONL log written by the tracker")
    parser.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite next to the log)")
    parser.add_argument("--force", action="store_true", help="import even if already imported")
    args = parser.parse_args(argv)
    try:
        run_ids = replay(args.log, args.uri, args.force)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(args.uri, args.log.resolve().parent)
    if run_ids:
        print(f"imported into {uri}, run(s): {' '.join(run_ids)}")
    else:
        print(f"{args.log}: nothing new to import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
