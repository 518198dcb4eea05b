"""Optimiser parameter groups and the learning-rate schedule.

Groups follow the paper's recipe: the pretrained backbone learns at `backbone_lr`, the modules MFRNet adds
(MoE, weight heads, camera embedding, necks) at `lr`; biases at `bias_lr_factor` x their role's lr. Each
group is then split into non-expert and expert parts in DeepSpeed's format (expert parts carry `moe: True`
and the expert group's name): expert gradients are averaged over the expert-data-parallel group only.
"""
from __future__ import annotations

import math

import torch
from deepspeed.moe.utils import is_moe_param

from mfrnet_ds.config import OptimConfig


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    groups = []
    for role, named in model.param_groups_by_role().items():
        base_lr = cfg.lr if role == "new" else cfg.backbone_lr
        for is_bias in (False, True):
            params = [p for n, p in named if (p.dim() == 1) == is_bias]
            if params:
                groups.append({"name": f"{role}.{'bias' if is_bias else 'weight'}", "params": params,
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


def build_scheduler(total_steps: int, warmup_steps: int, cfg: OptimConfig):
    """A callable DeepSpeed turns into the engine's scheduler (stepped by engine.step, checkpointed with it)."""
    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg))
    return make
