"""Optimiser parameter groups and the learning-rate schedules.

Groups follow the reference's make_optimizer: the pretrained backbone learns at `backbone_lr` (its biases
too); the MoE layers and the FFM (generators and weight heads) at `lr`; the other modules MFRNet adds (camera
embedding, necks, token reductions) at `lr`, their biases at `bias_lr_factor` x `lr`. Each group is then
split into non-expert and expert parts in DeepSpeed's format (expert parts carry `moe: True` and the expert
group's name): expert gradients are averaged over the expert-data-parallel group only.
"""
from __future__ import annotations

import math

import torch
from deepspeed.moe.utils import is_moe_param

from mfrnet_ds.config import OptimConfig


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    groups = []
    for role, named in model.param_groups_by_role().items():
        base_lr = cfg.backbone_lr if role == "backbone" else cfg.lr
        # "head": only the head's biases get the factor (the reference's MoE/FFM override and its backbone lr
        # both replace the doubled bias lr with the role's plain lr); "all_1d": biases and norm gains everywhere
        every = cfg.bias_lr_scope == "all_1d"
        split = every or role == "head"
        for is_bias in (False, True) if split else (False,):
            params = [p for n, p in named if not split or (p.dim() == 1 if every else "bias" in n) == is_bias]
            if params:
                groups.append({"name": f"{role}.bias" if is_bias else role, "params": params,
                               "lr": base_lr * (cfg.bias_lr_factor if is_bias else 1.0),
                               "weight_decay": cfg.weight_decay})
    return split_expert_groups(groups)


def split_expert_groups(groups: list[dict]) -> list[dict]:
    """DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`, in a fixed order.

    Its version walks a Python set of group names, whose order changes with the hash seed of each
    process: the optimiser groups then come out in a different order after a restart and the saved
    optimiser state no longer fits on resume.
    """
    dense, experts = [], []
    for g in groups:
        by_group: dict[str, list] = {}
        plain = []
        for p in g["params"]:
            if is_moe_param(p):
                by_group.setdefault(p.group_name, []).append(p)
            else:
                plain.append(p)
        if plain:
            dense.append({**g, "params": plain})
        for name in sorted(by_group):
            experts.append({**g, "name": name, "moe": True, "params": by_group[name]})
    return dense + experts


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # Adam with L2 weight decay as in the reference; the fused kernel where the device has one.
    fused = device.type == "cuda"
    return torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of every group's lr: linear warm-up from warmup_factor, then cosine to min_lr_factor."""
    if warmup_steps > 0 and step < warmup_steps:
        return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_lr(t: int, base_lr: float, cfg: OptimConfig, epochs: int) -> float:
    """The lr of epoch `t` (1-based, as the reference steps its timm-style scheduler with the epoch number
    before each epoch) for a group whose own lr is `base_lr`.

    Warm-up (t < warmup_epochs) goes linearly from the *absolute* warmup_factor x cfg.lr, the same for every
    group (so the backbone's lr falls towards its own during warm-up); then a cosine over all `epochs` (no
    warm-up offset) to the absolute floor min_lr_factor x cfg.lr, which the last epoch reaches. Each epoch
    t < epochs is scaled by (1 + n), n a standard normal drawn from torch.Generator seeded lr_noise_seed + t,
    redrawn until |n| < lr_noise.
    """
    start, floor = cfg.warmup_factor * cfg.lr, cfg.min_lr_factor * cfg.lr
    if t < cfg.warmup_epochs:
        lr = start + t * (base_lr - start) / cfg.warmup_epochs
    else:
        lr = floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * t / epochs))
    if cfg.lr_noise > 0 and 0 <= t < epochs:
        gen = torch.Generator().manual_seed(cfg.lr_noise_seed + t)
        while abs(noise := torch.randn(1, generator=gen).item()) >= cfg.lr_noise:
            pass
        lr *= 1 + noise
    return lr


def build_scheduler(total_steps: int, warmup_steps: int, cfg: OptimConfig, steps_per_epoch: int = 1,
                    epochs: int = 1):
    """A callable DeepSpeed turns into the engine's scheduler (stepped by engine.step, checkpointed with it).

    "cosine": one multiplier for every group, per step. "reference": each group's lr per epoch from
    `reference_lr`, held for the whole epoch.
    """
    def make(optimizer):
        if cfg.schedule == "cosine":
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg))
        bases = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [
            (lambda step, b=b: reference_lr(step // steps_per_epoch + 1, b, cfg, epochs) / b) for b in bases])
    return make
