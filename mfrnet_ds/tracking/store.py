"""Where a run's artifacts live, so that a run folder can be moved or copied with them.

A sqlite store `<OUT_DIR>/mlflow.db` keeps its artifacts in `<OUT_DIR>/mlartifacts/`, but the store
records them as `mlflow-artifacts:/<experiment>/<run_id>/artifacts` - a path relative to the artifact
root, not an absolute `file://` URI. That is MLflow's own proxied-artifacts form: a server started over
the folder, wherever it is now,

    mlflow server --backend-store-uri sqlite:///$OUT_DIR/mlflow.db --artifacts-destination $OUT_DIR/mlartifacts

(or `python -m mfrnet_ds.tracking.ui OUT_DIR`) serves them. Without a server (the trainer writing
the sqlite file itself, a script reading it), `install()` teaches MLflow's client to resolve
`mlflow-artifacts:` next to the sqlite file of the tracking URI; with an http(s) tracking URI MLflow's
own behaviour (ask the server) is unchanged.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

ARTIFACT_DIR = "mlartifacts"
DB_NAME = "mlflow.db"
SCHEME = "mlflow-artifacts"


def sqlite_uri(folder: str | os.PathLike) -> str:
    """The URI of the sqlite store of a run folder: `sqlite:///<abs folder>/mlflow.db`."""
    return f"sqlite:///{Path(folder).resolve() / DB_NAME}"


def resolve_tracking_uri(uri: str | None, folder: str | os.PathLike) -> str:
    """The one rule for which store to use: an explicit URI, else MLFLOW_TRACKING_URI, else the sqlite store of
    `folder` (the training's out_dir, the folder of an offline log, the current folder for compare)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(folder)


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a `sqlite:///...` URI, else None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])   # sqlite:////abs/path -> /abs/path; sqlite:///rel -> rel


def artifact_root(uri: str) -> Path | None:
    """The artifact folder that belongs to a sqlite store: `mlartifacts/` beside the database file."""
    db = sqlite_path(uri)
    return None if db is None else db.resolve().parent / ARTIFACT_DIR


def portable_location(uri: str, experiment: str) -> str | None:
    """Artifact location for a new experiment of a sqlite store (None: other stores decide)."""
    if sqlite_path(uri) is None:
        return None
    return f"{SCHEME}:/{re.sub(r'[^A-Za-z0-9_.-]+', '_', experiment).strip('_') or 'experiment'}"


def _local_or_proxied(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
    """Artifact repository for a `mlflow-artifacts:` URI: the folder beside a sqlite store, else the server."""
    from mlflow import get_tracking_uri
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    root = artifact_root(tracking_uri or get_tracking_uri())
    if root is None:
        return MlflowArtifactsRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
    relative = urlparse(artifact_uri).path.lstrip("/")
    return LocalArtifactRepository((root / relative).as_uri(), tracking_uri=tracking_uri)


def install() -> None:
    """Register the resolver for `mlflow-artifacts:` URIs in this process (idempotent)."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

    _artifact_repository_registry.register(SCHEME, _local_or_proxied)
