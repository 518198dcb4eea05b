"""Experiment tracking: MLflow runs written by rank 0, an offline fallback, and its replay.

Importing it lets this process's MLflow client read and write a sqlite store's portable artifact
locations (`mlflow-artifacts:/...` resolved beside the database file; see tracking/store.py).
"""
from mfrnet_ds.tracking import store as _store

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

_store.install()
