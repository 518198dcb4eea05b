"""A team's tracking server that goes away in the middle of a run: a real `mlflow server` (its own sqlite store
and artifact folder under tmp_path), a 2-rank training (real launcher) logging to it through
MLFLOW_TRACKING_URI, the server killed after step 2 and started again on the same store. The run must finish,
replay what it logged while the server was down into the same run once the server answers again
(tracking.reconnect_s), say so in its log, and the store must hold every metric of every step afterwards.
Slow (launcher and server start-up), run in CI."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mfrnet_ds.tracking.names import mlflow_metrics

from launcher import ROOT, free_port, kill_session, rank_processes, read_train_log, remove_shm_buffers, \
    start_deepspeed, tiny_shards, tiny_train_args

STEPS = 6
KILL_AFTER = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


def start_server(store: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})   # no job worker processes


def server_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for_health(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 90
    while not server_answers(port):
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not answer /health within 90 s"
        time.sleep(0.3)


def stop_server(server: subprocess.Popen) -> None:
    kill_session(server)    # SIGKILL to its own session: the server and its gunicorn/uvicorn worker, at once


def wait_for_step(out: Path, step: int, trainer: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "train_log.jsonl").is_file() or read_train_log(out)[-1]["step"] < step:
        assert trainer.poll() is None, f"training ended early ({trainer.returncode})\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def restart_before_the_end(server: subprocess.Popen, port: int, log: Path, out: Path,
                           trainer: subprocess.Popen) -> None:
    """Wait for the restarted server; should the training reach its last step first (a slow start on a loaded
    machine), hold its ranks (SIGSTOP) until the server answers, so that what is tested is the replay while
    the run goes on, not the message of a run that ended before its server came back."""
    held: list = []
    try:
        deadline = time.monotonic() + 90
        while not server_answers(port):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            if not held and read_train_log(out)[-1]["step"] >= STEPS - 1:
                held = list(rank_processes(trainer).values())
                for rank in held:
                    rank.suspend()
            time.sleep(0.2)
    finally:
        for rank in held:
            rank.resume()


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run_loses_no_metric(shards, tmp_path):
    store, out, port = tmp_path / "server", tmp_path / "run", free_port()
    store.mkdir()
    server_log, train_log = tmp_path / "server.log", tmp_path / "train.log"
    uri = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    # the server starts while the launcher starts the ranks (both take ~10 s here): the tracker usually finds it
    # up; when not, it starts offline and the same replay brings the run into the store
    server = start_server(store, port, server_log)
    master_port = free_port()
    trainer = None
    try:
        args = tiny_train_args(shards, out, "model.frm.ep_size=2", f"train.max_steps={STEPS}",
                               "tracking.enabled=true", "tracking.reconnect_s=1", "train.eval_on_stop=false")
        trainer = start_deepspeed(ROOT / "launch/train.py", args, train_log, master_port=master_port,
                                  env={"MLFLOW_TRACKING_URI": uri})
        wait_for_health(server, port, server_log)
        wait_for_step(out, KILL_AFTER, trainer, train_log)
        stop_server(server)
        down_at = read_train_log(out)[-1]["step"]
        wait_for_step(out, down_at + 1, trainer, train_log)   # at least one step logged while it is down
        server = start_server(store, port, server_log)      # the same store, the same address
        restart_before_the_end(server, port, server_log, out, trainer)
        assert trainer.wait(timeout=300) == 0, train_log.read_text()[-4000:]
    finally:
        if trainer is not None and trainer.poll() is None:
            kill_session(trainer)
        remove_shm_buffers("127.0.0.1", master_port)
        stop_server(server)
    wall = time.perf_counter() - t0
    text = train_log.read_text()
    assert f"MLflow store {uri} unreachable" in text, text[-4000:]
    assert f"MLflow store {uri} is back" in text and "replayed into run" in text, text[-4000:]
    assert "still unreachable" not in text

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")      # read the store itself, server stopped
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]           # the gap went into the same run
    run = runs[0]
    assert run.info.status == "FINISHED"
    records = read_train_log(out)       # every metric of every step (evaluation is off: train.eval_on_stop=false)
    assert [r["step"] for r in read_train_log(out)] == list(range(1, STEPS + 1))
    want: dict[str, list] = {}
    for record in records:   # the trainer's flat keys, as named and scaled in MLflow (tracking/names.py)
        logged = mlflow_metrics({k: v for k, v in record.items() if k not in ("step", "time")})
        for key, value in logged.items():
            want.setdefault(key, []).append((record["step"], pytest.approx(value, rel=1e-6, abs=1e-9)))
    missing = {}
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        if got != sorted(points, key=lambda p: p[0]):
            missing[key] = (got, points)
    assert not missing, f"{len(missing)} of {len(want)} metrics differ in the store: {list(missing.items())[:3]}"
    print(f"server killed after step {down_at} and restarted; {len(want)} metrics x {STEPS} steps all in the "
          f"store; {wall:.1f}s wall")
