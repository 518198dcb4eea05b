"""End of a training run on rank 0 (a trainer hook): the files a person looks at, written to OUT_DIR and
handed to the tracker as artifacts.

    OUT_DIR/config.json, deepspeed.json, metrics.json, metrics_untrained.json, train_log.jsonl,
            eval_log.jsonl         (trainer)
    OUT_DIR/manifest.json          copy of the shard manifest the run trained on
    OUT_DIR/plots/                 learning_curves.png, expert_load_<name>.png
    OUT_DIR/model.pt               fp32 export of the latest checkpoint (mfrnet_ds.export)
    model (logged model)           the same weights as an `mlflow.pytorch` model with signature and input
                                   example (trainer/logged_model.py); param `num_params`
    OUT_DIR/experts/               the expert picture (mfrnet_ds.viz) on query samples

Artifacts keep these names (plots/ and experts/ as folders). Every step is on its own: a failure warns
(FinalizeWarning) and the next step runs, so a broken plot never costs the run its model or metrics.
Heavy imports happen inside the steps for the same reason: importing this module cannot fail the trainer.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

log = logging.getLogger("mfrnet_ds.train")

RUN_FILES = ("config.json", "deepspeed.json", "metrics.json", "metrics_untrained.json", "train_log.jsonl",
             "eval_log.jsonl")
EXPERT_SAMPLES = 8


class FinalizeWarning(UserWarning):
    """One end-of-run step failed; the others still ran."""


def _step(what: str, fn):
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - whatever fails here, the trained run must survive
        warnings.warn(f"finalize_run: {what} failed ({type(exc).__name__}: {str(exc)[:500]}); continuing without "
                      "it", FinalizeWarning, stacklevel=3)
        return None
    log.debug("finalize: %s (%.1f s)", what, time.perf_counter() - start)
    return result


def finish_run(t) -> dict[str, Path]:
    """The end-of-run hook: finalize_run for the Trainer `t` (rank 0, after a finished run)."""
    return finalize_run(t.tracker, out_dir=t.out_dir, ckpt_dir=t.ckpt_dir, shards=t.config.data.shards,
                        manifest=t.manifest, config=t.config)


def finalize_run(tracker, *, out_dir: Path, ckpt_dir: Path, shards: str, manifest: dict, config,
                 expert_samples: int = EXPERT_SAMPLES) -> dict[str, Path]:
    """Write and log the end-of-run files; returns what was written ({name: path}). Rank 0 only."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    start = time.perf_counter()
    written: dict[str, Path] = {}
    for name in RUN_FILES:
        if (out_dir / name).is_file():
            _step(f"log {name}", lambda name=name: tracker.log_artifact(out_dir / name))

    manifest_file = _step("copy the shard manifest", lambda: _copy_manifest(shards, manifest, out_dir))
    if manifest_file:
        written["manifest"] = manifest_file
        _step("log manifest.json", lambda: tracker.log_artifact(manifest_file))

    plots = _step("plots", lambda: _plots(tracker, out_dir, getattr(config, "name", "run")))
    if plots:
        written.update(plots)
        _step("log plots", lambda: tracker.log_artifact(out_dir / "plots", "plots"))

    model_file = _step("export model.pt", lambda: _export(ckpt_dir, out_dir / "model.pt"))
    loaded = model_file and _step("load model.pt", lambda: _load(model_file))
    if loaded:
        written["model"] = model_file
        _step("log model.pt", lambda: tracker.log_artifact(model_file))
        num_params = sum(p.numel() for p in loaded[1].parameters())
        _step("log num_params", lambda: tracker.log_params({"num_params": num_params}))
        register = getattr(getattr(config, "tracking", None), "register_model", "")
        _step("log the mlflow.pytorch model", lambda: tracker.online("log_model", lambda client, run_id: _log_model(
            tracker.tracking_uri, run_id, loaded, shards, register)))
        experts = _step("expert picture", lambda: _experts(tracker, loaded[1], shards, out_dir / "experts",
                                                           expert_samples, _last_step(out_dir)))
        if experts:
            written["experts"] = out_dir / "experts"
            _step("log the expert picture", lambda: tracker.log_artifact(out_dir / "experts", "experts"))
    log.info("end of run: %s written to %s and logged (%.1f s)", ", ".join(sorted(written)) or "nothing", out_dir,
             time.perf_counter() - start)
    return written


def _copy_manifest(shards, manifest: dict, out_dir: Path) -> Path:
    target = out_dir / "manifest.json"
    source = Path(shards) / "manifest.json"
    if "://" not in str(shards) and not str(shards).startswith("pipe:") and source.is_file():
        shutil.copyfile(source, target)
    else:  # remote shards, or moved away during training: the copy the trainer read is still good
        target.write_text(json.dumps(manifest, indent=2))
    return target


def _plots(tracker, out_dir: Path, name: str) -> dict[str, Path]:
    from mfrnet_ds.tracking.plots import expert_load_heatmap, learning_curves, log_history, read_train_log

    history = log_history(read_train_log(out_dir / "train_log.jsonl"))
    last_step = max((int(steps[-1]) for steps, _ in history.values() if len(steps)), default=0)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    evals = eval_history(tracker, out_dir, last_step)
    curves = learning_curves(history, plots_dir / "learning_curves.png", evals=evals, title=f"{name}: {out_dir}")
    if curves:
        found["learning_curves"] = curves
    heatmap = expert_load_heatmap(history, plots_dir, name)
    if heatmap:
        found["expert_load"] = heatmap
    return found


def eval_history(tracker, out_dir: Path, last_step: int) -> dict:
    """{mAP|R1|R5|R10: (steps, values)} of every evaluation, from the run's MLflow history; when the
    store cannot be read (offline run, no tracking), from metrics_untrained.json (step 0) and
    metrics.json (the last step), which the trainer writes."""
    import numpy as np

    from mfrnet_ds.tracking.plots import EVAL_KEYS

    run_id, uri = getattr(tracker, "run_id", None), getattr(tracker, "tracking_uri", None)
    if run_id and uri and not getattr(tracker, "is_offline", False):
        try:
            from mlflow.tracking import MlflowClient

            from mfrnet_ds.tracking.history import fetch_histories
            from mfrnet_ds.tracking.names import flat_key

            client = MlflowClient(uri)
            keys = [k for k in client.get_run(run_id).data.metrics if flat_key(k) in EVAL_KEYS]
            return dict(fetch_histories(client, {run_id: keys}).get(run_id, {}))
        except Exception as exc:  # noqa: BLE001 - fall back to the files
            warnings.warn(f"finalize_run: evaluation history not readable from {uri} ({type(exc).__name__}); "
                          "plotting the first and last evaluation only", FinalizeWarning, stacklevel=2)
    points: dict[str, dict[int, float]] = {}
    for name, step in (("metrics_untrained.json", 0), ("metrics.json", last_step)):
        path = out_dir / name
        if path.is_file():
            for key, value in json.loads(path.read_text()).items():
                if key in EVAL_KEYS:
                    points.setdefault(key, {})[step] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in points.items()}


def _export(ckpt_dir: Path, target: Path) -> Path:
    from mfrnet_ds.engine.ckpt import export

    return export(ckpt_dir, target)


def _load(model_file: Path):
    from mfrnet_ds.engine.ckpt import load_exported

    return load_exported(model_file)


def _log_model(uri: str, run_id: str, loaded, shards, register: str):
    from mfrnet_ds.trainer.logged_model import log_trained_model

    return log_trained_model(uri, run_id, loaded, shards, register)


def _last_step(out_dir: Path) -> int:
    from mfrnet_ds.tracking.plots import read_train_log

    path = out_dir / "train_log.jsonl"
    return max((int(r.get("step", 0)) for r in read_train_log(path)), default=0) if path.is_file() else 0


def _experts(tracker, model, shards, out: Path, n: int, step: int) -> Path:
    """The expert picture, and its shares as metrics: the chart and eval/moe/<layer>/expert_<e>_share come
    from one evaluation-mode pass over the query split."""
    from mfrnet_ds.viz import expert_pictures

    if out.exists():
        shutil.rmtree(out)  # this folder is ours: a resumed run must not keep the earlier pictures
    result = expert_pictures(model, shards, out, n=n, split="query", progress=False)
    tracker.log_metrics({f"eval_expert_load/{result.layer}/{e}": v for e, v in enumerate(result.shares)}, step)
    return out
