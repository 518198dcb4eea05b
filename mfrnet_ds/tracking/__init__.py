"""Experiment tracking: MLflow runs written by rank 0, an offline fallback, and its replay."""

from mfrnet_ds.tracking.mlflow import (
    MlflowTracker,
    NullTracker,
    TrackingWarning,
    flatten_params,
    resolve_tracking_uri,
    tracker_for_rank,
)

__all__ = ["MlflowTracker", "NullTracker", "TrackingWarning", "flatten_params", "resolve_tracking_uri",
           "tracker_for_rank"]
