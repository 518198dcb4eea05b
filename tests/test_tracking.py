"""MLflow tracking against real stores: sqlite files in tmp dirs and a real `mlflow server`."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from mfrnet_ds.compare import expert_load_matrices
from mfrnet_ds.compare import main as compare_main
from mfrnet_ds.tracking import MlflowTracker, NullTracker, TrackingWarning, flatten_params, tracker_for_rank
from mfrnet_ds.tracking.offline import OfflineLog, read_records
from mfrnet_ds.tracking.replay import main as replay_main

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
EXPERIMENT = "rgbnt201"


@contextlib.contextmanager
def restored_env():
    """The tracker sets MLflow's HTTP bounds in os.environ; give the environment back afterwards."""
    saved = {k: os.environ.get(k) for k in (*HTTP_ENV, "MLFLOW_TRACKING_URI")}
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def clean_env():
    with restored_env():
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_like_run(tracker, name, num_experts, steps=range(0, 30, 5), shift=0.0):
    """What the trainer logs: loss parts and expert load per log step, mAP/R1 per evaluation."""
    run_id = tracker.start(EXPERIMENT, name,
                           params={"model": {"frm": {"num_experts": num_experts, "top_k": 2},
                                             "img_size": [256, 128]},
                                   "note": "x" * (MAX_PARAM_VAL_LENGTH + 50)},
                           tags={"dataset": "rgbnt201"})
    logged = {}
    for step in steps:
        metrics = {"loss": 3.0 / (step + 1) + shift, "lr": 1e-4, "samples_per_s": 100.0 + num_experts}
        metrics.update({f"expert_load/frm.11/{e}": (e + 1 + step % 3) / 100 for e in range(num_experts)})
        if step % 10 == 0:
            metrics.update({"mAP": 10.0 + step + shift, "R1": 20.0 + step})
        tracker.log_metrics(metrics, step)
        logged[step] = metrics
    tracker.log_params({"num_params": 1000 * num_experts})
    return run_id, logged


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store written by the tracker the way training would: two runs, artifacts."""
    out = tmp_path_factory.mktemp("run")
    runs = {}
    for name, experts, shift in (("frm6", 6, 0.0), ("frm8", 8, 1.0)):
        with restored_env():  # runs before the per-test clean_env: no MLFLOW_TRACKING_URI from outside
            tracker = MlflowTracker(out, system_metrics=name == "frm6", system_metrics_interval=0.2)
        assert tracker.tracking_uri == f"sqlite:///{out.resolve() / 'mlflow.db'}"  # the default store
        with tracker:
            run_id, logged = train_like_run(tracker, name, experts, shift=shift)
            (out / "config.json").write_text(json.dumps({"experts": experts}))
            tracker.log_artifact(out / "config.json")
            (out / "metrics.json").write_text(json.dumps({"mAP": logged[20]["mAP"]}))
            tracker.log_artifact(out / "metrics.json", "final")
            if name == "frm6":
                time.sleep(0.8)  # a few system-metric samples
        assert not tracker.is_offline
        runs[name] = (run_id, logged)
    return out, f"sqlite:///{out / 'mlflow.db'}", runs


def test_tracking_uri_default_and_environment(tmp_path):
    assert MlflowTracker(tmp_path / "o").tracking_uri == f"sqlite:///{(tmp_path / 'o').resolve()}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    assert MlflowTracker(tmp_path / "o").tracking_uri == "http://127.0.0.1:9"
    assert MlflowTracker(tmp_path / "o", tracking_uri="sqlite:///x.db").tracking_uri == "sqlite:///x.db"


def test_flatten_params():
    flat = flatten_params({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": "y" * (MAX_PARAM_VAL_LENGTH + 1)})
    assert flat["a.b.c"] == "1" and flat["a.d"] == "[1, 2]" and flat["e"] == "None"
    assert len(flat["f"]) == MAX_PARAM_VAL_LENGTH and flat["f"].endswith("...")
    with pytest.raises(TypeError, match="params"):
        flatten_params([1, 2])


def test_run_reads_back_from_another_process(store):
    out, uri, runs = store
    script = f"""
import json, mlflow
import mfrnet_ds.tracking  # the store's artifact locations (mlflow-artifacts:/) resolve beside it
mlflow.set_tracking_uri({uri!r})
client = mlflow.MlflowClient()
df = mlflow.search_runs(experiment_names=[{EXPERIMENT!r}])
result = {{}}
for _, row in df.iterrows():
    rid = row["run_id"]
    result[row["tags.mlflow.runName"]] = {{
        "status": row["status"],
        "params": {{c[7:]: row[c] for c in df.columns if c.startswith("params.") and isinstance(row[c], str)}},
        "loss": [(m.step, m.value) for m in client.get_metric_history(rid, "train/loss")],
        "mAP": [(m.step, m.value) for m in client.get_metric_history(rid, "eval/mAP")],
        "metric_keys": sorted(client.get_run(rid).data.metrics),
        "artifacts": sorted(a.path for a in client.list_artifacts(rid))
                     + sorted(a.path for a in client.list_artifacts(rid, "final")),
    }}
print(json.dumps(result))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == ["frm6", "frm8"]
    run = result["frm6"]
    _, logged = runs["frm6"]
    assert run["status"] == "FINISHED"
    assert run["params"]["model.frm.num_experts"] == "6" and run["params"]["model.img_size"] == "[256, 128]"
    assert run["params"]["num_params"] == "6000"
    assert len(run["params"]["note"]) == MAX_PARAM_VAL_LENGTH
    assert run["loss"] == [[s, m["loss"]] for s, m in logged.items()]
    assert run["mAP"] == [[s, pytest.approx(m["mAP"] / 100)] for s, m in logged.items() if "mAP" in m]  # fraction
    assert "moe/frm.11/expert_5_share" in run["metric_keys"] and "train/samples_per_s" in run["metric_keys"]
    assert any(k.startswith("system/cpu") for k in run["metric_keys"])  # MLflow's system metrics
    assert not any(k.startswith("system/") for k in result["frm8"]["metric_keys"])  # turned off there
    assert run["artifacts"] == ["config.json", "final", "final/metrics.json"]


def test_compare_cli_prints_both_runs_and_writes_pngs(store, tmp_path):
    out, uri, runs = store
    plots = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "mfrnet_ds.compare", "--experiment", EXPERIMENT, "--uri", uri,
           "--metric", "mAP", "loss", "--out", str(plots), "--log"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith("run"))
    assert "model.frm.num_experts" in header and "best mAP" in header and "samples/s" in header
    assert "model.frm.top_k" not in header  # equal in both runs: not a difference
    for name, experts, best_map in (("frm6", "6", "30.00"), ("frm8", "8", "31.00")):
        row = next(line for line in lines if line.strip().startswith(f"{name}-{runs[name][0][:6]}"))
        assert row.split()[2] == experts and best_map in row
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == sorted(["curve_mAP.png", "curve_loss.png",
                           f"expert_load_frm6-{runs['frm6'][0][:6]}.png", f"expert_load_frm8-{runs['frm8'][0][:6]}.png"])
    for png in plots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    image = plt_imread(plots / f"expert_load_frm8-{runs['frm8'][0][:6]}.png")
    assert image.shape[0] > 200 and image.shape[1] > 300

    # The comparison was logged as a run of its own experiment, never among the training runs.
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_runs(experiment_names=[EXPERIMENT])) == 2
    logged = mlflow.search_runs(experiment_names=[f"{EXPERIMENT}-comparisons"],
                                filter_string="tags.`mfrnet.kind` = 'comparison'")
    assert len(logged) == 1 and "frm6" in logged["tags.mlflow.note.content"][0]
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(logged["run_id"][0], "comparison")}
    assert "comparison/curve_mAP.png" in names and "comparison/compare.csv" in names
    assert compare_main(["--uri", uri, "--out", str(tmp_path / "again")]) == 0   # the comparisons are not a choice
    assert (tmp_path / "again" / "compare.csv").read_text().count("\n") == 3  # header + the two runs


def plt_imread(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_compare_reports_bad_requests(store, capsys):
    _, uri, runs = store
    assert compare_main(["--experiment", "nope", "--uri", uri]) == 2
    assert "experiment 'nope' not found" in capsys.readouterr().err
    assert compare_main(["--experiment", EXPERIMENT, "--uri", uri, "--runs", "deadbeef"]) == 2
    assert "deadbeef" in capsys.readouterr().err


def offline_run(out, uri, name, steps):
    tracker = MlflowTracker(out, tracking_uri=uri, http_max_retries=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.start(EXPERIMENT, name, {"model": {"frm": {"num_experts": 6}}}, {"k": "v"}) is None
        for step in steps:
            tracker.log_metrics({"loss": 1.0 / (step + 1), "expert_load/frm.11/0": 0.5}, step)
        return tracker, [w for w in caught if issubclass(w.category, TrackingWarning)]


def test_unreachable_store_warns_once_writes_jsonl_and_replays(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    tracker, ours = offline_run(tmp_path / "out", uri, "offline-run", range(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (tmp_path / "cfg.json").write_text("{}")
        tracker.log_artifact(tmp_path / "cfg.json")
        (tmp_path / "metrics.json").write_text(json.dumps({"mAP": 1.5}))
        tracker.log_artifact(tmp_path / "metrics.json", "final")
        tracker.close()
    assert time.monotonic() - started < 20  # bounded retries: no minutes-long hang
    assert not [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1 and uri in str(ours[0].message) and "replay" in str(ours[0].message)
    log = tmp_path / "out" / "mlflow_offline.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["type"] for r in records] == ["start"] + ["metrics"] * 4 + ["artifact"] * 2 + ["end"]

    target = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay_main([str(log), "--uri", target]) == 0
    client = MlflowClient(target)
    mlflow.set_tracking_uri(target)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    assert len(runs) == 1 and runs["status"][0] == "FINISHED" and runs["params.model.frm.num_experts"][0] == "6"
    assert runs["tags.k"][0] == "v" and runs["tags.mlflow.runName"][0] == "offline-run"
    run_id = runs["run_id"][0]
    expected = [(r["step"], r["metrics"]["train/loss"], r["timestamp"]) for r in records if r["type"] == "metrics"]
    assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train/loss")] == expected
    assert {a.path for a in client.list_artifacts(run_id)} == {"cfg.json", "final"}
    assert replay_main([str(log), "--uri", target]) == 0  # nothing new: no duplicate points
    assert len(client.get_metric_history(run_id, "train/loss")) == 4
    assert replay_main([str(log), "--uri", f"sqlite:///{tmp_path / 'other.db'}"]) == 2  # partly imported elsewhere

    # The store is back: the training resumes the same run (a changed param is kept, with a warning).
    resumed = MlflowTracker(tmp_path / "out", tracking_uri=target, system_metrics=False)
    with pytest.warns(TrackingWarning, match="model.frm.num_experts"):
        assert resumed.start(EXPERIMENT, "offline-run", {"model": {"frm": {"num_experts": 8}}, "new": 1},
                             resume_run_id=run_id) == run_id
    resumed.log_metrics({"loss": 0.1}, 4)
    resumed.close()
    run = client.get_run(run_id)
    assert run.data.params["model.frm.num_experts"] == "6" and run.data.params["new"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3, 4]

    # The store goes away again: the same log grows, and the next import takes only the new lines.
    again, ours = offline_run(tmp_path / "out", uri, "offline-again", range(2))
    again.close()
    assert len(ours) == 1
    assert replay_main([str(log), "--uri", target]) == 0
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.mlflow.runName"]) == ["offline-run", "offline-again"]
    assert len(client.get_metric_history(run_id, "train/loss")) == 5
    assert len(client.get_metric_history(runs["run_id"][1], "train/loss")) == 2


def test_offline_log_survives_a_writer_killed_mid_line(tmp_path):
    log = OfflineLog(tmp_path / "t.jsonl")
    log.append({"type": "metrics", "step": 0, "timestamp": 1, "metrics": {"loss": 1.0}})
    with open(log.path, "a") as f:
        f.write('{"type": "metrics", "st')  # killed here
    assert [n for n, _ in read_records(log.path)] == [1]  # the partial line is not read yet
    log.append({"type": "end", "status": "FINISHED", "timestamp": 2})
    with pytest.warns(UserWarning, match="t.jsonl:2: skipping a damaged line"):
        assert [(n, r["type"]) for n, r in read_records(log.path)] == [(1, "metrics"), (3, "end")]


def test_null_tracker_and_rank_choice(tmp_path):
    assert isinstance(tracker_for_rank(1, tmp_path), NullTracker)
    assert isinstance(tracker_for_rank(0, tmp_path), MlflowTracker)
    null = NullTracker()
    assert null.start(EXPERIMENT, "x", {"a": 1}) is None
    null.log_metrics({"loss": 1.0}, 0)
    null.log_artifact(tmp_path / "missing")
    null.close()
    assert not any(tmp_path.iterdir())  # wrote nothing


def test_mlflow_server_serves_the_runs_and_tracker_survives_losing_it(store, tmp_path):
    out, uri, runs = store
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--artifacts-destination", str(out / "served_artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    assert response.read().strip() == b"OK"
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not answer /health within 90 s"
                time.sleep(0.5)
        experiment_id = MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            listed = {r["info"]["run_id"] for r in json.load(response)["runs"]}
        assert {runs["frm6"][0], runs["frm8"][0]} <= listed

        # A run tracked through the server, which then goes away in the middle of training.
        tracker = MlflowTracker(tmp_path / "client", tracking_uri=base, http_max_retries=0, system_metrics=False)
        run_id = tracker.start("served", "through-server", {"a": 1}, {})
        assert run_id
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    finally:
        stop(server)
        log.close()
    with pytest.warns(TrackingWarning, match="unreachable in log_metrics") as caught:
        for step in range(3, 6):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        tracker.close()
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    # The offline part goes into the very same run once the store is back (here: its sqlite file).
    assert replay_main([str(tmp_path / "client" / "mlflow_offline.jsonl"), "--uri", uri]) == 0
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(6)]
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def stop(server: subprocess.Popen) -> None:
    """Stop the server and every worker it forked (its own process group), whatever happened."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # workers that outlived the main process
    except ProcessLookupError:
        pass


def test_expert_load_matrix_is_steps_by_experts():
    history = {"expert_load/frm.11/0": (np.array([0, 5]), np.array([0.2, 0.4])),
               "expert_load/frm.11/10": (np.array([0, 5]), np.array([0.5, 0.1])),
               "expert_load/frm.11/2": (np.array([5]), np.array([0.5])),
               "expert_load/ffm/0": (np.array([5]), np.array([1.0])),
               "loss": (np.array([0, 5]), np.array([2.0, 1.0]))}
    layers = expert_load_matrices(history)
    assert sorted(layers) == ["ffm", "frm.11"]
    steps, names, matrix = layers["frm.11"]
    assert steps.tolist() == [0, 5] and names == ["0", "2", "10"]
    np.testing.assert_array_equal(matrix, [[0.2, np.nan, 0.5], [0.4, 0.5, 0.1]])


def test_metric_names_sort_into_namespaces_and_map_back():
    from mfrnet_ds.tracking.names import flat_key, from_mlflow, mlflow_metrics

    trainer = {"loss": 1.5, "lr": 1e-4, "mAP": 42.0, "R1": 50.0, "best_mAP": 42.0, "best_epoch": 3,
               "mAP_missing_nt": 12.0, "pixel_R5": 9.0, "damaged_query": 2, "effective_rank": 7.5,
               "expert_load/frm.3/1": 0.25, "dropped/frm.3": 0.0, "balance/frm.3": 1.1,
               "eval_expert_load/frm.3/0": 0.5}
    logged = mlflow_metrics(trainer)
    assert logged == {"train/loss": 1.5, "train/lr": 1e-4, "eval/mAP": 0.42, "eval/R1": 0.5, "eval/best_mAP": 0.42,
                      "eval/best_epoch": 3.0, "eval/missing_nt/mAP": 0.12, "eval/pixel_baseline/R5": 0.09,
                      "eval/damaged_query": 2.0, "eval/health/effective_rank": 7.5,
                      "moe/frm.3/expert_1_share": 0.25, "moe/frm.3/dropped_share": 0.0,
                      "moe/frm.3/balance_loss": 1.1, "eval/moe/frm.3/expert_0_share": 0.5}
    for key, value in trainer.items():
        name = next(n for n in logged if flat_key(n) == key)
        assert from_mlflow(name, logged[name]) == (key, pytest.approx(value))
    assert from_mlflow("mAP", 42.0) == ("mAP", 42.0)   # a run logged before the namespaces: already percent


def test_compare_reads_runs_logged_before_the_namespaces(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'old.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("old")
    run_id = client.create_run(experiment_id, run_name="old-run").info.run_id
    for step, (mAP, share) in enumerate([(10.0, 0.2), (25.0, 0.4)]):
        client.log_batch(run_id, metrics=[mlflow.entities.Metric("mAP", mAP, 0, step),
                                          mlflow.entities.Metric("R1", mAP + 5, 0, step),
                                          mlflow.entities.Metric("samples_per_s", 99.0, 0, step),
                                          mlflow.entities.Metric("expert_load/frm.3/0", share, 0, step)])
    client.set_terminated(run_id)
    assert compare_main(["--uri", uri, "--metric", "eval/mAP", "--out", str(tmp_path / "cmp")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("old-run"))
    assert "25.00" in row and "30.00" in row and "99.00" in row   # best mAP, best R1 (percent), samples/s
    assert (tmp_path / "cmp" / "curve_mAP.png").is_file()
    assert (tmp_path / "cmp" / f"expert_load_old-run-{run_id[:6]}.png").is_file()


def test_sqlite_store_records_artifacts_relative_to_it(tmp_path):
    import shutil

    tracker = MlflowTracker(tmp_path / "a", system_metrics=False)
    with tracker:
        tracker.start("portable", "r", {})
        (tmp_path / "x.json").write_text(json.dumps({"x": 1}))
        tracker.log_artifact(tmp_path / "x.json", "d")
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.info.artifact_uri == f"mlflow-artifacts:/portable/{tracker.run_id}/artifacts"
    assert (tmp_path / "a/mlartifacts/portable" / tracker.run_id / "artifacts/d/x.json").is_file()
    shutil.move(tmp_path / "a", tmp_path / "b")
    got = MlflowClient(f"sqlite:///{tmp_path / 'b/mlflow.db'}").download_artifacts(tracker.run_id, "d/x.json",
                                                                                 str(tmp_path))
    assert json.loads(open(got).read()) == {"x": 1}


def test_logged_model_registers_by_name_and_embeds_like_the_model(person_shards, tmp_path):
    import torch

    from mfrnet_ds.config import load_config
    from mfrnet_ds.model import build_model
    from mfrnet_ds.trainer.logged_model import log_trained_model
    from mfrnet_ds.viz import take_samples

    config = load_config(None, ["model.preset=tiny", "model.img_size=[64,32]", "model.num_classes=8"])
    model = build_model(config).eval()
    tracker = MlflowTracker(tmp_path / "out", system_metrics=False)
    with tracker:
        tracker.start("models", "r", {})
        info = tracker.online("log_model", lambda client, run_id: log_trained_model(
            tracker.tracking_uri, run_id, (config, model), str(person_shards), "mfrnet-tiny"))
    assert info is not None and info.signature is not None and info.saved_input_example_info is not None
    assert info.signature.inputs.input_names() == ["images", "camids"]
    assert MlflowClient(tracker.tracking_uri).get_latest_versions("mfrnet-tiny")[0].version in (1, "1")
    mlflow.set_tracking_uri(tracker.tracking_uri)
    loaded = mlflow.pytorch.load_model("models:/mfrnet-tiny/1")
    batch = take_samples(person_shards, "query", 3, (64, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["images"], batch["camids"]),
                                   model(batch["images"], batch["camids"]).embedding, atol=1e-6, rtol=0)


def test_ui_links_land_on_the_runs_table_and_compare_page(tmp_path, capsys):
    from mfrnet_ds.tracking.ui import compare_url, main as ui_main, runs_url, server_command

    assert runs_url("http://h:5000/", "3") == "http://h:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert compare_url("http://h:5000", "3", ["a", "b"]) == \
        "http://h:5000/#/compare-runs?runs=%5B%22a%22%2C%22b%22%5D&experiments=%5B%223%22%5D"
    command = server_command(tmp_path / "run", port=5001)
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'run/mlflow.db'}"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path / "run/mlartifacts")
    assert ui_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mlflow.db does not exist" in err and len(err.splitlines()) == 1
