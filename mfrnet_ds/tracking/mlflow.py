"""MLflow tracking for the trainer: one run per training, written by rank 0 only.

    tracker = MlflowTracker(out_dir)            # NullTracker() on other ranks (see tracker_for_rank)
    run_id = tracker.start("rgbnt201", "frm6-top2", params=cfg_dict, tags={...})
    tracker.log_metrics({"loss": 1.3, "lr": 3e-4}, step=100)
    tracker.log_artifact("out/config.yaml")
    tracker.close()

Store: `MLFLOW_TRACKING_URI` when set, else an embedded sqlite file `<out_dir>/mlflow.db` with
artifacts in `<out_dir>/mlartifacts` (no server), recorded relative to that folder so the run folder can
move (tracking/store.py). Metric names go through tracking/names.py (`loss` -> `train/loss`, `mAP` ->
`eval/mAP` as a fraction, ...). Tracking never stops training: when the store
cannot be reached (at start or later) the tracker warns once and appends everything from then on to
`<out_dir>/mlflow_offline.jsonl`. While offline it asks the store again every `reconnect_s` seconds
(tracking.reconnect_s; a tracking server's /health answers without retries) and at close; once the
store answers, the offline part is replayed into the same run (tracking/replay.py, which remembers how
far it got) and logging goes on online, both logged. A store still unreachable at the end leaves the
file for `python -m mfrnet_ds.tracking.replay FILE`, and the log says so.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from mlflow.tracking import MlflowClient

from mfrnet_ds.tracking import store
from mfrnet_ds.tracking.client import (ensure_experiment, flatten_params, log_metrics_batched, log_params_batched,
                                       split_resumed_params, tag_value)
from mfrnet_ds.tracking.names import mlflow_metrics
from mfrnet_ds.tracking.offline import OfflineLog

DB_NAME = store.DB_NAME
resolve_tracking_uri = store.resolve_tracking_uri   # re-exported: the tracker and replay take it from here
ARTIFACT_DIR = store.ARTIFACT_DIR
OFFLINE_NAME = "mlflow_offline.jsonl"
log = logging.getLogger("mfrnet_ds.tracking")


class TrackingWarning(UserWarning):
    """The tracking store could not be reached; numbers go to the offline log instead."""


_HTTP_ENV_SET_HERE: set[str] = set()


def _bound_http(max_retries: int, timeout: int, backoff: int) -> None:
    """MLflow reads these per request from the environment; a value the user exported wins."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", max_retries), ("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", backoff)):
        if name not in os.environ or name in _HTTP_ENV_SET_HERE:
            os.environ[name] = str(int(value))
            _HTTP_ENV_SET_HERE.add(name)


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- trackers

class MlflowTracker:
    """Writes one MLflow run; falls back to an offline JSONL log when the store is unreachable.

    `http_max_retries`, `http_timeout` (s) and `http_backoff` bound how long a call to an unreachable
    server blocks (MLflow's own defaults retry for minutes); the MLFLOW_HTTP_REQUEST_* environment
    variables win when set. `system_metrics_interval` (s) is MLflow's sampling period for CPU,
    memory, disk, network (and GPU with nvidia-ml-py) metrics, logged as `system/...`.
    """

    def __init__(self, out_dir: str | os.PathLike, *, tracking_uri: str | None = None,
                 offline_file: str | os.PathLike | None = None, system_metrics: bool = True,
                 system_metrics_interval: float = 10.0, http_max_retries: int = 2, http_timeout: int = 10,
                 http_backoff: int = 1, reconnect_s: float = 30.0):
        self.out_dir = Path(out_dir).resolve()
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.out_dir)
        self.offline = OfflineLog(offline_file or self.out_dir / OFFLINE_NAME)
        self.system_metrics = system_metrics
        self.system_metrics_interval = system_metrics_interval
        _bound_http(http_max_retries, http_timeout, http_backoff)
        self.run_id: str | None = None
        self.is_offline = False
        self._client: MlflowClient | None = None
        self._monitor = None
        self._start_record: dict | None = None
        self._closed = False
        self.reconnect_s = reconnect_s
        self._last_probe = 0.0

    # -- lifecycle

    def start(self, experiment: str, run_name: str, params, tags: Mapping[str, str] | None = None,
              resume_run_id: str | None = None, experiment_description: str = "") -> str | None:
        """Create (or resume) the run; returns its id, or None if the store was unreachable."""
        if self._start_record is not None:
            raise RuntimeError("MlflowTracker.start() called twice; use one tracker per run")
        flat = flatten_params(params)
        tags = {str(k): tag_value(v) for k, v in (tags or {}).items()}
        self.run_id = resume_run_id
        self._start_record = {"type": "start", "experiment": experiment, "run_name": run_name,
                              "params": flat, "tags": tags, "tracking_uri": self.tracking_uri}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            client = MlflowClient(self.tracking_uri)
            experiment_id = ensure_experiment(client, experiment, self.tracking_uri, experiment_description)
            if resume_run_id:
                existing = client.get_run(resume_run_id).data.params
                client.update_run(resume_run_id, status="RUNNING")
                flat, changed = split_resumed_params(existing, flat)
                if changed:
                    warnings.warn(f"resumed run {resume_run_id}: params changed since the run started, kept "
                                  f"the old values (MLflow cannot overwrite): {sorted(changed)}",
                                  TrackingWarning, stacklevel=2)
            else:
                self.run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
                tags = {}
            log_params_batched(client, self.run_id, flat, tags)
            self._client = client
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop training
            self._go_offline("start", exc)
            return self.run_id
        if self.system_metrics:
            self._start_system_metrics(resume=resume_run_id is not None)
        return self.run_id

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED). Safe to call twice."""
        if self._closed or self._start_record is None:
            return
        self._closed = True
        if self._monitor is not None and not self.is_offline:
            self._monitor.finish()  # flushes the last system metrics before the run ends
        self._write(lambda: self._client.set_terminated(self.run_id, status=status),
                    {"type": "end", "status": status, "timestamp": _now_ms()}, "close")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FAILED" if exc_type is not None else "FINISHED")

    # -- logging

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """All metrics of one step in one request (MLflow's log_batch), under their MLflow names
        (tracking/names.py: the trainer's flat keys -> eval/, train/, moe/ namespaces)."""
        timestamp = _now_ms()
        values = mlflow_metrics({str(k): v for k, v in metrics.items()})
        self._write(lambda: log_metrics_batched(self._client, self.run_id, values, int(step), timestamp),
                    {"type": "metrics", "step": int(step), "timestamp": timestamp, "metrics": values},
                    "log_metrics")

    def log_params(self, params) -> None:
        """Params known only after start (e.g. the model's parameter count)."""
        flat = flatten_params(params)
        self._write(lambda: log_params_batched(self._client, self.run_id, flat),
                    {"type": "params", "params": flat}, "log_params")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a whole directory. The file must still exist if it has to be replayed later."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        log = self._client_call("log_artifacts" if path.is_dir() else "log_artifact")
        self._write(lambda: log(self.run_id, str(path), artifact_path),
                    {"type": "artifact", "path": str(path), "artifact_path": artifact_path}, "log_artifact")

    def online(self, where: str, fn) -> object:
        """`fn(client, run_id)` against the store, for what the offline log cannot replay (a logged model,
        dataset inputs); skipped with a warning when the run is offline. Returns fn's result or None."""
        self._require_started()
        if self.is_offline:
            warnings.warn(f"MLflow run offline: {where} skipped", TrackingWarning, stacklevel=2)
            return None
        try:
            return fn(self._client, self.run_id)
        except Exception as exc:  # noqa: BLE001 - training must survive a store failure
            warnings.warn(f"MLflow {where} failed: {type(exc).__name__}: {str(exc)[:300]}", TrackingWarning,
                          stacklevel=2)
            return None

    # -- internals

    def _require_started(self) -> None:
        if self._start_record is None:
            raise RuntimeError("MlflowTracker: call start() before logging")
        if self._closed:
            raise RuntimeError("MlflowTracker: the run is closed")

    def _client_call(self, name: str):
        return lambda *args: getattr(self._client, name)(*args)

    def _write(self, online, record: dict, where: str) -> None:
        """Run `online` against the store, or append `record` to the offline log."""
        if record["type"] != "end":
            self._require_started()
        # a second try for a busy sqlite file ("database is locked"); MLflow's HTTP client retries by itself
        attempts = 0 if self.is_offline else 1 if self.tracking_uri.startswith(("http://", "https://")) else 2
        for attempt in range(attempts):
            try:
                online()
                return
            except Exception as exc:  # noqa: BLE001 - any store failure must not stop training
                if attempt + 1 < attempts:
                    time.sleep(0.5)
                    continue
                self._go_offline(where, exc)
        self.offline.append(record)
        self._reconnect(force=record["type"] == "end")

    def _go_offline(self, where: str, exc: Exception) -> None:
        if self.is_offline:
            return
        self.is_offline = True
        if self._monitor is not None:  # its thread would keep failing against the same store
            self._monitor._shutdown_event.set()
        warnings.warn(f"MLflow store {self.tracking_uri} unreachable in {where} "
                      f"({type(exc).__name__}: {str(exc)[:300]}). Training continues; tracking goes to "
                      f"{self.offline.path}. Import it later with: python -m mfrnet_ds.tracking.replay "
                      f"{self.offline.path} [--uri URI]", TrackingWarning, stacklevel=3)
        self.offline.append({**self._start_record, "run_id": self.run_id, "timestamp": _now_ms()})

    def _reconnect(self, force: bool = False) -> None:
        """Offline and the store answers again (asked at most every reconnect_s, always when `force`): replay
        the offline log into the run and go back online."""
        if not self.is_offline or (not force and time.monotonic() - self._last_probe < self.reconnect_s):
            return
        self._last_probe = time.monotonic()
        from mfrnet_ds.tracking.replay import replay, store_answers   # late: replay imports this module

        if not store_answers(self.tracking_uri):
            if force:
                log.warning("MLflow store %s still unreachable at the end of the run: the steps logged since it "
                            "went away are only in %s; import them with: python -m mfrnet_ds.tracking.replay %s",
                            self.tracking_uri, self.offline.path, self.offline.path)
            return
        try:
            run_ids = replay(self.offline.path, self.tracking_uri, close_open_run=False)
        except Exception as exc:  # noqa: BLE001 - a store that fails again: stay offline, ask again later
            log.warning("MLflow store %s answers again but the replay of %s failed (%s: %s); staying offline",
                        self.tracking_uri, self.offline.path, type(exc).__name__, str(exc)[:300])
            return
        self.run_id = self.run_id or (run_ids[-1] if run_ids else None)  # a run first created by the replay
        self._client = self._client or MlflowClient(self.tracking_uri)
        self.is_offline = False
        log.warning("MLflow store %s is back: what was logged while it was unreachable (%s) is replayed into "
                    "run %s; logging goes on online", self.tracking_uri, self.offline.path, self.run_id)

    def _start_system_metrics(self, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_interval,
                                                 resume_logging=resume, tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - e.g. psutil missing: no system metrics, run goes on
            self._monitor = None
            warnings.warn(f"MLflow system metrics disabled: {type(exc).__name__}: {exc}", TrackingWarning,
                          stacklevel=3)


class NullTracker:
    """The tracker of every rank but 0: same methods, does nothing."""

    run_id = None
    is_offline = False

    def start(self, experiment, run_name, params, tags=None, resume_run_id=None):
        return None

    def log_metrics(self, metrics, step):
        pass

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def online(self, where, fn):
        return None

    def close(self, status="FINISHED"):
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        pass


def tracker_for_rank(rank: int, out_dir: str | os.PathLike, **kwargs) -> MlflowTracker | NullTracker:
    """Rank 0 writes the run; the other ranks get a NullTracker."""
    return MlflowTracker(out_dir, **kwargs) if rank == 0 else NullTracker()
