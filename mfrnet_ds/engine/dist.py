"""The only module that reads ranks and world sizes, and the home of the trainer's own collectives;
builds the DeepSpeed engine.

Works the same under `deepspeed` (it sets RANK/WORLD_SIZE/LOCAL_RANK and passes --local_rank), under
SLURM or torchrun, and as a plain `python` process (then a one-rank group is made on loopback).
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from deepspeed.accelerator import get_accelerator

from mfrnet_ds.config import Config, ConfigError, check, derive_batch
from mfrnet_ds.model.moe import expert_parallel_rank


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def init_distributed(local_rank: int | None = None, timeout_s: float = 600.0) -> DistInfo:
    if "RANK" not in os.environ:
        # A plain `python launch/train.py`: a world of one on loopback.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if local_rank is not None and local_rank >= 0:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # DeepSpeed makes its expert/data-parallel groups with dist.new_group(ranks) and no timeout, so they get
        # torch's default (30 min gloo, 10 min NCCL), not ours: a frozen peer would stall the MoE all-to-all.
        # There is no public knob; these module defaults are what new_group falls back to.
        distributed_c10d.default_pg_timeout = timeout
        distributed_c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(timeout=timeout)
    acc = get_accelerator()
    lr = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cuda":
        acc.set_device(lr)
        device = torch.device("cuda", lr)
    else:
        device = torch.device(acc.device_name())
    return DistInfo(dist.get_rank(), dist.get_world_size(), lr, device)


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x`, concatenated in rank order: the global micro batch, on every rank.

    The loader gives rank r the r-th contiguous slice of each global micro batch, so the result is exactly
    the batch one process would hold. Differentiable: every rank computes the same global loss from the
    gathered rows, so the gradient of our rows is the SUM of all ranks' gradients for them (all-reduce, then
    our slice); DeepSpeed's averaging over the data-parallel ranks then divides by the world size and the
    update is the single-process one.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return _GatherRows.apply(x)
    return _all_gather_rows(x)


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        return _all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()   # reduced in place: never the tensor autograd handed us
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(config: Config, world_size: int, path: str | None = None) -> dict:
    """Read the DeepSpeed JSON and fill in the batch sizes and clipping from the experiment config.

    Batch keys already in the JSON must agree with what the experiment config derives.
    """
    path = path or config.train.deepspeed_config
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config={path}: file does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={path}: not valid JSON ({e})") from None
    check(config, world_size)
    micro, accum = derive_batch(config, world_size)
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": config.train.global_batch}
    for key, value in want.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{path}: {key}={ds[key]} conflicts with the experiment config, which gives "
                              f"{value} (train.global_batch={config.train.global_batch}, world {world_size}, "
                              f"micro {micro} x accumulation {accum}); remove it from the JSON or make them agree")
        ds[key] = value
    if config.optim.grad_clip > 0:
        ds["gradient_clipping"] = config.optim.grad_clip
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(f"{path}: ZeRO stage 3 does not support DeepSpeed's MoE layers; use stage 0, 1 or 2")
    ds.setdefault("zero_allow_untested_optimizer", True)  # our own torch Adam with MoE groups
    ds.setdefault("steps_per_print", 10 ** 9)             # our loop does the logging
    return ds


def initialize(model, optimizer, scheduler, ds_config: dict, info: DistInfo):
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    _check_expert_layout(model, info)
    return engine


def _check_expert_layout(model, info: DistInfo) -> None:
    """The experts were initialised for `rank % ep_size`; make sure DeepSpeed grouped ranks that way."""
    from deepspeed.utils import groups
    for layer in model.moe_layers:
        if layer.ep_size > 1:
            got = groups._get_expert_parallel_rank(f"ep_size_{layer.ep_size}")
            want = expert_parallel_rank(info.rank, layer.ep_size)
            if got != want:
                raise RuntimeError(f"{layer.name}: DeepSpeed put rank {info.rank} at expert-parallel rank {got}, "
                                   f"expected {want}")


def engine_dtype(engine) -> torch.dtype:
    """The dtype inputs must have for this engine (DeepSpeed casts the module, not the batch)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
