"""A DeepSpeed engine from a model and a config: parameter groups, optimizer, LR schedule, DeepSpeed.

    engine = build_engine(model, config, info, ds_config, total_steps=plan.total_steps, ...)

The trainer and the scripts that drive `train_step` by hand (bench/, tests/scripts/) build it here, so they
measure and test the engine the trainer runs.
"""
from __future__ import annotations

from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine import malloc
from mfrnet_ds.engine.optim import build_optimizer, build_scheduler, param_groups


def build_engine(model, config, info: D.DistInfo, ds_config: dict, total_steps: int | None, warmup_steps: int = 0,
                 steps_per_epoch: int = 1, epochs: int = 1, compile: str = "off"):
    """Collective (DeepSpeed's initialize). `total_steps` None: no LR schedule (an engine that only evaluates;
    DeepSpeed's ZeRO and bf16 wrappers still want the optimizer's MoE groups, and one never stepped allocates no
    moments). `compile`: "on", "off" or "auto" (on when the device is CUDA), train.compile's rule; compiled
    before DeepSpeed wraps the model so the engine runs the compiled blocks. Host memory follows train.malloc
    (engine/malloc.py), for the whole process."""
    malloc.apply(config.train.malloc, info.device)
    if compile == "on" or (compile == "auto" and info.device.type == "cuda"):
        model.compile_dense_blocks()
    optimizer = build_optimizer(param_groups(model, config.optim), config.optim, info.device)
    scheduler = None if total_steps is None else build_scheduler(total_steps, warmup_steps, config.optim,
                                                                  steps_per_epoch, epochs)
    return D.initialize(model, optimizer, scheduler, ds_config, info)
