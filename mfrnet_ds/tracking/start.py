"""Opening the MLflow run of a training: params, standard tags, description, dataset inputs.

    tracker = start_tracking(config, info, manifest, ds_config, run_id)   # trainer/loop.py, every rank

Rank 0 opens (or, on resume, reopens) the run; the other ranks, and runs with tracking.enabled false,
get a NullTracker.
"""
from __future__ import annotations

from mfrnet_ds.tracking.mlflow import NullTracker, tracker_for_rank
from mfrnet_ds.tracking.run_info import (
    experiment_description,
    git_tags,
    log_datasets,
    run_name,
    standard_tags,
)


def run_params(config, manifest: dict, ds_config: dict, world_size: int) -> dict:
    """The run's params: the whole config (dotted), the DeepSpeed JSON, and what the shards hold."""
    return {"config": config.to_dict(), "deepspeed": ds_config, "world_size": world_size,
            "git_commit": git_tags().get("mlflow.source.git.commit", "unknown"),
            "data": {"dataset": manifest["dataset"], "num_classes": manifest["num_classes"],
                     "num_cameras": manifest["num_cameras"], "synthetic": bool(manifest.get("synthetic")),
                     **{f"{k}_samples": v["num_samples"] for k, v in manifest["splits"].items()}}}


def start_tracking(config, info, manifest: dict, ds_config: dict, run_id: str | None):
    if not config.tracking.enabled:
        return NullTracker()
    t = config.tracking
    tracker = tracker_for_rank(info.rank, config.train.out_dir, tracking_uri=t.uri or None,
                               system_metrics_interval=t.system_metrics_interval, reconnect_s=t.reconnect_s)
    if info.rank != 0:
        return tracker
    experiment = t.experiment or manifest["dataset"]
    tracker.start(experiment, t.run_name or run_name(config, info.world_size),
                  run_params(config, manifest, ds_config, info.world_size),
                  tags=standard_tags(config, manifest, info.world_size), resume_run_id=run_id,
                  experiment_description=experiment_description(experiment, manifest["dataset"]))
    if run_id is None:   # a resumed run has its inputs already
        tracker.online("dataset inputs", lambda client, rid: log_datasets(client, rid, manifest, config.data.shards))
    return tracker
