"""A torch module logged as an MLflow model (`mlflow.pytorch`) of a run, with its signature and input example.

    info = log_pytorch_model(tracking_uri, run_id, module, signature, example, registered_name="name")

What the module is and how its signature is found is the caller's (trainer/logged_model.py for MFRNet).
"""
from __future__ import annotations

import logging

from torch import nn


def log_pytorch_model(tracking_uri: str, run_id: str, module: nn.Module, signature, input_example,
                      registered_name: str = "", pip_requirements: list[str] | None = None,
                      params: dict | None = None, metadata: dict | None = None):
    """Log `module` (pickled) as the run's `model`; returns MLflow's ModelInfo."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    # MLflow checks the input example through the pyfunc flavour, which takes one tensor: a module of several
    # inputs fails that check, and MLflow logs the whole example (megabytes of numbers for images) as a
    # warning. mlflow.pytorch.load_model is the way in (docs/TRACKING.md); keep that log quiet.
    quiet = logging.getLogger("mlflow.models.model")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            return mlflow.pytorch.log_model(
                module, name="model", signature=signature, input_example=input_example,
                serialization_format="pickle", registered_model_name=registered_name or None,
                pip_requirements=pip_requirements, params=params, metadata=metadata)
    finally:
        quiet.setLevel(level)
        mlflow.set_tracking_uri(previous)
