"""A tiny real training (one process, `python launch/train.py`) writes ONE MLflow run into a sqlite store:
params, metric histories and the end-of-run artifacts, read back by another process; `--resume`
continues that same run."""
import json
import os
import re
import subprocess
import sys

import mlflow
import pytest

import mfrnet_ds.tracking  # noqa: F401 - this process's MLflow client resolves the store's mlflow-artifacts:/ URIs
from launcher import ROOT
from mfrnet_ds.shards import build
from mfrnet_ds.synth import make_tree

EXPERIMENT = "demo"  # tracking.experiment of configs/demo.yaml

READ_BACK = """
import json, sys, mlflow
import mfrnet_ds.tracking  # resolves the store's portable artifact locations beside it
uri = sys.argv[1]
mlflow.set_tracking_uri(uri)
client = mlflow.MlflowClient(uri)
runs = mlflow.search_runs(experiment_names=[{experiment!r}])
out = []
for _, row in runs.iterrows():
    rid = row["run_id"]
    keys = sorted(client.get_run(rid).data.metrics)
    history = {{k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
               for k in keys if not k.startswith("system/")}}
    artifacts = sorted(a.path for a in client.list_artifacts(rid))
    for folder in ("plots", "experts"):
        artifacts += sorted(a.path for a in client.list_artifacts(rid, folder))
    out.append({{"run_id": rid, "status": row["status"], "name": row["tags.mlflow.runName"],
                "params": {{c[7:]: row[c] for c in runs.columns
                            if c.startswith("params.") and isinstance(row[c], str)}},
                "metric_keys": keys, "history": history, "artifacts": artifacts}})
print(json.dumps(out))
""".format(experiment=EXPERIMENT)


def train(shards, out, *extra):
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"),
           f"data.shards={shards}", f"train.out_dir={out}", "model.img_size=[64,32]", "train.global_batch=16",
           "data.num_instances=4", "model.frm.ep_size=1", "data.num_workers=0", "train.log_every=1",
           "train.eval_every=1", f"tracking.uri=sqlite:///{out}/mlflow.db", *extra]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, \
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert "finalize_run" not in proc.stderr, proc.stderr[-4000:]  # no end-of-run step failed
    return proc


def read_back(out):
    proc = subprocess.run([sys.executable, "-c", READ_BACK, f"sqlite:///{out}/mlflow.db"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train 2 epochs (4 steps), read the store back; resume to 3 epochs (6 steps), read it back again."""
    raw = tmp_path_factory.mktemp("raw")
    make_tree("rgbnt201", raw, ids=16, cams=2, per_cam=2, seed=3)          # 8 train ids x 4 images
    shards = tmp_path_factory.mktemp("shards")
    build("rgbnt201", raw, shards, maxcount=64)
    out = tmp_path_factory.mktemp("train") / "run"
    train(shards, out, "train.epochs=2")
    first = read_back(out)
    first_log = (out / "train_log.jsonl").read_text()
    first_metrics = json.loads((out / "metrics.json").read_text())
    from mfrnet_ds.export import load_exported
    num_params = sum(p.numel() for p in load_exported(out / "model.pt")[1].parameters())
    train(shards, out, "train.epochs=3", "--resume")
    return {"out": out, "shards": shards, "first": first, "first_log": first_log,
            "first_metrics": first_metrics, "num_params": num_params, "resumed": read_back(out)}


def steps(history, key):
    return [s for s, _ in history[key]]


def test_one_run_with_params_metrics_and_artifacts(runs):
    assert len(runs["first"]) == 1, [r["run_id"] for r in runs["first"]]
    run = runs["first"][0]
    assert run["status"] == "FINISHED" and run["name"].startswith("frm4-cosine-top")
    assert " EP1 W1 demo-tiny " in run["name"]
    params = run["params"]
    assert params["config.model.preset"] == "tiny" and params["config.model.img_size"] == "[64, 32]"
    assert params["config.model.frm.num_experts"] == "4" and params["config.model.frm.ep_size"] == "1"
    assert params["config.train.epochs"] == "2" and params["world_size"] == "1"
    assert params["deepspeed.train_batch_size"] == "16"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", params["git_commit"])
    assert params["data.dataset"] == "rgbnt201" and params["data.num_classes"] == "8"
    assert params["data.train_samples"] == "32" and params["data.query_samples"] == "32"

    history = run["history"]   # MLflow names (tracking/names.py); the trainer's files keep the flat keys
    logged = [json.loads(line) for line in runs["first_log"].splitlines()]
    assert steps(history, "train/loss") == [1, 2, 3, 4] == [r["step"] for r in logged]
    assert [v for _, v in history["train/loss"]] == pytest.approx([r["loss"] for r in logged])
    for key in ("train/loss_id", "train/loss_tri", "train/loss_aux", "train/lr", "train/samples_per_s",
                "moe/frm.3/dropped_share", "moe/frm.3/balance_loss"):
        assert steps(history, key) == [1, 2, 3, 4], key
    loads = [history[f"moe/frm.3/expert_{e}_share"] for e in range(4)]
    for step_index in range(4):  # the shares of the 4 FRM experts add up to all routed tokens
        assert sum(series[step_index][1] for series in loads) == pytest.approx(1.0, abs=1e-5)
    assert any(k.startswith("moe/ffm.") for k in run["metric_keys"])
    assert not [k for k in run["metric_keys"] if "/" not in k], run["metric_keys"]   # every metric namespaced
    assert steps(history, "eval/mAP") == [0, 2, 4] and steps(history, "eval/R1") == [0, 2, 4]  # untrained, per epoch
    assert history["eval/mAP"][-1][1] == pytest.approx(runs["first_metrics"]["mAP"] / 100)   # fraction vs percent
    assert history["eval/best_mAP"][-1][1] == pytest.approx(runs["first_metrics"]["best_mAP"] / 100)
    assert params["num_params"] == str(runs["num_params"])

    artifacts = set(run["artifacts"])
    for name in ("config.json", "deepspeed.json", "metrics.json", "metrics_untrained.json", "manifest.json",
                 "train_log.jsonl", "eval_log.jsonl", "model.pt", "plots/learning_curves.png", "plots/expert_load_demo.png",
                 "experts/expert_shares.png", "experts/expert_shares.json"):
        assert name in artifacts, (name, sorted(artifacts))
    pictures = [a for a in artifacts if re.fullmatch(r"experts/experts_\d\d_pid\d+_cam\d\.png", a)]
    assert len(pictures) == 8   # spread over identities and cameras (8 query ids x 2 cameras here)
    assert len({re.search(r"pid(\d+)", a)[1] for a in pictures}) == 8
    assert len({re.search(r"cam(\d)", a)[1] for a in pictures}) == 2


def test_model_artifact_loads_and_draws_the_expert_picture(runs, tmp_path):
    from mfrnet_ds.export import load_exported
    from mfrnet_ds.viz import main as viz_main

    run_id = runs["resumed"][0]["run_id"]
    model_file = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model.pt", dst_path=str(tmp_path),
                                                     tracking_uri=f"sqlite:///{runs['out']}/mlflow.db")
    config, model = load_exported(model_file)
    assert config.model.img_size == (64, 32) and len(model.vit.blocks[3].mlp.local_experts) == 4
    # the CLI on the run folder: exports the latest checkpoint itself
    pictures = tmp_path / "pictures"
    assert viz_main(["experts", "--checkpoint", str(runs["out"]), "--shards", str(runs["shards"]),
                     "--out", str(pictures), "--n", "3"]) == 0
    assert len(list(pictures.glob("experts_*.png"))) == 3 and (pictures / "expert_shares.png").is_file()


def test_resume_continues_the_same_run(runs):
    assert len(runs["resumed"]) == 1
    first, resumed = runs["first"][0], runs["resumed"][0]
    assert resumed["run_id"] == first["run_id"] and resumed["status"] == "FINISHED"
    history = resumed["history"]
    assert steps(history, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert history["train/loss"][:4] == first["history"]["train/loss"]
    assert steps(history, "eval/mAP") == [0, 2, 4, 6]
    assert resumed["params"]["config.train.epochs"] == "2"  # MLflow keeps a param's first value
    assert "model.pt" in resumed["artifacts"] and "plots/learning_curves.png" in resumed["artifacts"]
    assert len([a for a in resumed["artifacts"] if a.startswith("experts/experts_")]) == 8


def test_finalize_warns_and_keeps_going_when_a_step_fails(runs, tmp_path, monkeypatch):
    import shutil

    from mfrnet_ds.config import load_config
    from mfrnet_ds.tracking import MlflowTracker
    from mfrnet_ds.trainer.finish import FinalizeWarning, finalize_run

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(name, "1")  # the tracker sets these in os.environ; monkeypatch gives them back
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "metrics.json", "metrics_untrained.json", "train_log.jsonl"):
        shutil.copyfile(runs["out"] / name, out / name)
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # a writer killed mid-line
    tracker = MlflowTracker(out, system_metrics=False)
    tracker.start("finalize", "broken-checkpoint", {})
    with pytest.warns(FinalizeWarning, match="export model.pt failed"):
        written = finalize_run(tracker, out_dir=out, ckpt_dir=out / "checkpoints", shards=str(runs["shards"]),
                               manifest={}, config=load_config(None))
    tracker.close()
    assert "model" not in written and "experts" not in written  # no checkpoint: no model, no picture
    assert written["learning_curves"].is_file() and written["manifest"].is_file()
    artifacts = mlflow.MlflowClient(tracker.tracking_uri).list_artifacts(tracker.run_id)
    names = {a.path for a in artifacts}
    assert {"config.json", "metrics.json", "manifest.json", "train_log.jsonl", "plots"} <= names
    assert "model.pt" not in names


# ---------------------------------------------------------------- the run folder moved, served by a real server

LOAD_AND_EMBED = """
import sys, torch, mlflow
from mfrnet_ds.stream.pipeline import eval_loader
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(sys.argv[2])          # a plain process: no launcher, no checkpoint folder
rows, index = [], []
with torch.no_grad():
    for b in eval_loader(sys.argv[3], "query", batch_size=16, img_size=tuple(model.model.cfg.img_size), num_workers=0):
        rows.append(model(b["images"][b["valid"]], b["camids"][b["valid"]]))
        index.append(b["index"][b["valid"]])
torch.save({"embedding": torch.cat(rows), "index": torch.cat(index)}, sys.argv[4])
"""


def _rest(base, path, body=None):
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
    return json.loads(raw) if path.startswith("/api/") else raw


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
    """The trained run folder copied, then MOVED to another place, served by `mlflow server` from there."""
    import shutil
    import signal
    import time
    import urllib.request

    from launcher import free_port
    from mfrnet_ds.tracking.ui import server_command

    copy = tmp_path_factory.mktemp("copied") / "run"
    shutil.copytree(runs["out"], copy, ignore=shutil.ignore_patterns("checkpoints"))
    moved = tmp_path_factory.mktemp("moved") / "elsewhere"
    shutil.move(copy, moved)
    port = free_port()
    server = subprocess.Popen(server_command(moved, port=port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True,   # the server's workers share its session: one killpg ends all
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                time.sleep(0.5)
        yield {"base": base, "moved": moved}
    finally:
        os.killpg(server.pid, signal.SIGKILL)   # read-only use: nothing to flush; SIGTERM takes ~30 s here
        server.wait(timeout=30)


def test_moved_run_folder_lists_and_downloads_its_artifacts(runs, served, tmp_path):
    base, moved = served["base"], served["moved"]
    assert not (moved.parent / "run").exists() and (moved / "mlflow.db").is_file()
    run_id = runs["resumed"][0]["run_id"]
    listed = _rest(base, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    assert listed["root_uri"].startswith("mlflow-artifacts:/")       # relative to the store, not file:///old/place
    assert {"config.json", "eval_log.jsonl", "model.pt", "experts"} <= {f["path"] for f in listed["files"]}
    config = json.loads(_rest(base, f"/get-artifact?path=config.json&run_uuid={run_id}"))
    assert config["model"]["preset"] == "tiny"
    # the moved sqlite store read without a server, by MLflow's client in this process (mfrnet_ds.tracking
    # imported above resolves mlflow-artifacts:/ beside the moved store)
    client = mlflow.MlflowClient(f"sqlite:///{moved}/mlflow.db")
    assert "manifest.json" in {a.path for a in client.list_artifacts(run_id)}
    got = client.download_artifacts(run_id, "experts/expert_shares.json", str(tmp_path))
    assert json.loads(open(got).read())["layer"] == "frm.3"


def test_server_shows_model_datasets_tags_and_the_model_embeds_like_evaluate(runs, served, tmp_path, request):
    base = served["base"]
    run_id = runs["resumed"][0]["run_id"]
    # launch/evaluate.py embeds the query split of the latest checkpoint, meanwhile the REST API is checked
    ours, theirs = tmp_path / "mlflow_query.pt", tmp_path / "evaluate_query.pt"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    evaluate = subprocess.Popen([sys.executable, str(ROOT / "launch/evaluate.py"), "--checkpoint", str(runs["out"]),
                                 "--shards", str(runs["shards"]), "--batch", "16", "--save-embeddings", str(theirs)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    request.addfinalizer(evaluate.kill)   # a failed check below must not leave it running
    run = _rest(base, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if head:   # a git checkout (CI's clone): MLflow's own git tags name the commit that trained
        assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.git.branch"]
        assert tags["mlflow.source.git.dirty"] in ("true", "false")
    assert tags["mlflow.user"]
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert "preset `tiny`" in tags["mlflow.note.content"] and "**synthetic**" in tags["mlflow.note.content"]
    inputs = run["inputs"]["dataset_inputs"]
    manifest = json.loads((runs["shards"] / "manifest.json").read_text())
    assert manifest["synthetic"] is True
    by_name = {i["dataset"]["name"]: i for i in inputs}
    assert set(by_name) == {"rgbnt201/train", "rgbnt201/query", "rgbnt201/gallery"}
    train_input = by_name["rgbnt201/train"]
    assert {"key": "mlflow.data.context", "value": "train"} in train_input["tags"]
    profile = json.loads(train_input["dataset"]["profile"])
    assert profile["num_samples"] == manifest["splits"]["train"]["num_samples"] and profile["synthetic"] is True
    assert str(runs["shards"]) in train_input["dataset"]["source"]
    experiment = _rest(base, f"/api/2.0/mlflow/experiments/get?experiment_id={run['info']['experiment_id']}")
    assert "eval/" in {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}["mlflow.note.content"]

    models = _rest(base, "/api/2.0/mlflow/logged-models/search",
                   {"experiment_ids": [run["info"]["experiment_id"]]})["models"]
    # the resumed run logged a model at each end of training: the newest holds the latest checkpoint's weights
    model = max((m for m in models if m["info"]["source_run_id"] == run_id),
                key=lambda m: int(m["info"]["creation_timestamp_ms"]))
    model_id = model["info"]["model_id"]
    mlmodel = _rest(base, f"/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files?artifact_file_path=MLmodel")
    assert b"pytorch" in mlmodel and b"signature" in mlmodel and b"saved_input_example_info" in mlmodel

    # another process loads the logged model through the server and embeds the same query split
    load = subprocess.run([sys.executable, "-c", LOAD_AND_EMBED, base, f"models:/{model_id}", str(runs["shards"]),
                           str(ours)], capture_output=True, text=True, timeout=300, env=env)
    assert load.returncode == 0, load.stderr[-4000:]
    _, err = evaluate.communicate(timeout=300)
    assert evaluate.returncode == 0, err[-4000:]
    import torch

    a, b = torch.load(ours, weights_only=True), torch.load(theirs, weights_only=True)
    assert torch.equal(a["index"], b["index"]) and a["embedding"].shape == b["embedding"].shape
    torch.testing.assert_close(a["embedding"], b["embedding"], atol=1e-5, rtol=0)


def test_expert_picture_shares_are_the_logged_evaluation_metric(runs, tmp_path):
    run_id = runs["resumed"][0]["run_id"]
    uri = f"sqlite:///{runs['out']}/mlflow.db"
    got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="experts/expert_shares.json",
                                              dst_path=str(tmp_path), tracking_uri=uri)
    picture = json.loads(open(got).read())
    assert picture["routing"].startswith("evaluation mode") and "evaluation mode" in picture["caption"]
    metrics = mlflow.MlflowClient(uri).get_run(run_id).data.metrics
    logged = [metrics[f"eval/moe/frm.3/expert_{e}_share"] for e in range(4)]
    assert logged == pytest.approx(picture["shares"], abs=1e-9) and sum(logged) == pytest.approx(1.0)
