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

from launcher import ROOT
from mfrnet_ds.shards import build
from mfrnet_ds.synth import make_tree

EXPERIMENT = "demo"  # tracking.experiment of configs/demo.yaml

READ_BACK = """
import json, sys, mlflow
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
    train(shards, out, "train.epochs=3", "--resume")
    return {"out": out, "shards": shards, "first": first, "first_log": first_log,
            "first_metrics": first_metrics, "resumed": read_back(out)}


def steps(history, key):
    return [s for s, _ in history[key]]


def test_one_run_with_params_metrics_and_artifacts(runs):
    assert len(runs["first"]) == 1, [r["run_id"] for r in runs["first"]]
    run = runs["first"][0]
    assert run["status"] == "FINISHED" and run["name"].startswith("demo-tiny-frm4")
    params = run["params"]
    assert params["config.model.preset"] == "tiny" and params["config.model.img_size"] == "[64, 32]"
    assert params["config.model.frm.num_experts"] == "4" and params["config.model.frm.ep_size"] == "1"
    assert params["config.train.epochs"] == "2" and params["world_size"] == "1"
    assert params["deepspeed.train_batch_size"] == "16"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", params["git_commit"])
    assert params["data.dataset"] == "rgbnt201" and params["data.num_classes"] == "8"
    assert params["data.train_samples"] == "32" and params["data.query_samples"] == "32"

    history = run["history"]
    logged = [json.loads(line) for line in runs["first_log"].splitlines()]
    assert steps(history, "loss") == [1, 2, 3, 4] == [r["step"] for r in logged]
    assert [v for _, v in history["loss"]] == pytest.approx([r["loss"] for r in logged])
    for key in ("loss_id", "loss_tri", "loss_aux", "lr", "samples_per_s", "dropped/frm.3"):
        assert steps(history, key) == [1, 2, 3, 4], key
    loads = [history[f"expert_load/frm.3/{e}"] for e in range(4)]
    for step_index in range(4):  # the shares of the 4 FRM experts add up to all routed tokens
        assert sum(series[step_index][1] for series in loads) == pytest.approx(1.0, abs=1e-5)
    assert any(k.startswith("expert_load/ffm.") for k in run["metric_keys"])
    assert steps(history, "mAP") == [0, 2, 4] and steps(history, "R1") == [0, 2, 4]  # untrained, then per epoch
    assert history["mAP"][-1][1] == pytest.approx(runs["first_metrics"]["mAP"])

    artifacts = set(run["artifacts"])
    for name in ("config.json", "deepspeed.json", "metrics.json", "metrics_untrained.json", "manifest.json",
                 "train_log.jsonl", "model.pt", "plots/learning_curves.png", "plots/expert_load_demo.png",
                 "experts/expert_shares.png", "experts/expert_shares.json"):
        assert name in artifacts, (name, sorted(artifacts))
    assert len([a for a in artifacts if re.fullmatch(r"experts/experts_\d\d_pid\d+_cam\d\.png", a)]) == 4


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
    assert steps(history, "loss") == [1, 2, 3, 4, 5, 6]
    assert history["loss"][:4] == first["history"]["loss"]
    assert steps(history, "mAP") == [0, 2, 4, 6]
    assert resumed["params"]["config.train.epochs"] == "2"  # MLflow keeps a param's first value
    assert "model.pt" in resumed["artifacts"] and "plots/learning_curves.png" in resumed["artifacts"]
    assert len([a for a in resumed["artifacts"] if a.startswith("experts/experts_")]) == 4


def test_finalize_warns_and_keeps_going_when_a_step_fails(runs, tmp_path, monkeypatch):
    import shutil

    from mfrnet_ds.config import load_config
    from mfrnet_ds.tracking import MlflowTracker
    from mfrnet_ds.tracking.finish import FinalizeWarning, finalize_run

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
