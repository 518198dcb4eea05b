"""Calls on an MLflow client the tracker and its replay share: the experiment (created with a portable artifact
location), config params flattened to MLflow's limits, and params, tags and metrics logged in batches."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from mfrnet_ds.tracking import store


def default_artifact_location(uri: str, experiment: str = "experiment") -> str | None:
    """Artifacts of a sqlite store live next to the database file, recorded relative to it (see
    tracking/store.py); other stores decide themselves."""
    return store.portable_location(uri, experiment)


def ensure_experiment(client: MlflowClient, name: str, uri: str, description: str = "") -> str:
    """Id of the experiment `name`, created (or restored from deleted) when needed; a description is
    set when the experiment has none (the UI shows `mlflow.note.content` above the runs)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=default_artifact_location(uri, name))
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    if description and "mlflow.note.content" not in (getattr(experiment, "tags", None) or {}):
        client.set_experiment_tag(experiment_id, "mlflow.note.content", description)
    return experiment_id


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def tag_value(value) -> str:
    """A tag's value as text, cut to MLflow's tag length limit."""
    return _truncate(str(value), MAX_TAG_VAL_LENGTH)


def flatten_params(params, prefix: str = "") -> dict[str, str]:
    """Nested dicts / dataclasses -> {"a.b.c": str}; values cut to MLflow's param length limit."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a mapping or dataclass, got {type(params).__name__}")
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=name + "."))
            continue
        if isinstance(value, (list, tuple)):
            try:
                text = json.dumps(list(value))
            except TypeError:
                text = str(list(value))
        else:
            text = str(value)
        flat[name] = _truncate(text, MAX_PARAM_VAL_LENGTH)
    return flat


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_params_batched(client: MlflowClient, run_id: str, params: Mapping[str, str],
                       tags: Mapping[str, str] | None = None) -> None:
    entities = [Param(k, v) for k, v in params.items()]
    tag_entities = [RunTag(k, tag_value(v)) for k, v in (tags or {}).items()]
    for batch in _batches(entities, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch)
    for batch in _batches(tag_entities, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=batch)


def log_metrics_batched(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                        timestamp: int) -> None:
    entities = [Metric(k, v, timestamp, step) for k, v in metrics.items()]
    for batch in _batches(entities, MAX_METRICS_PER_BATCH):  # one call unless > 1000 metrics
        client.log_batch(run_id, metrics=batch)


def split_resumed_params(existing: Mapping[str, str], params: Mapping[str, str]):
    """Params not yet on a resumed run, and those whose value changed (MLflow refuses to overwrite)."""
    new = {k: v for k, v in params.items() if k not in existing}
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    return new, changed
