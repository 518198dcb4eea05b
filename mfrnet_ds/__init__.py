"""mfrnet-ds: MFRNet (sparse-MoE multi-modal ReID) trained with DeepSpeed.

Public API: `load_config(path, overrides=())`, `build_model(config)`; `mfrnet_ds.eval.metrics.evaluate_rank`.
"""
from mfrnet_ds.config import Config, ConfigError, load_config


def build_model(config):
    # Imported on use: the model pulls in DeepSpeed and timm, which take seconds to import.
    from mfrnet_ds.model import build_model as _build
    return _build(config)


__all__ = ["Config", "ConfigError", "load_config", "build_model"]
