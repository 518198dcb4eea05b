"""The only module that reads ranks and world sizes, and the home of the trainer's own collectives;
builds the DeepSpeed engine.

Works the same under `deepspeed` (it sets RANK/WORLD_SIZE/LOCAL_RANK and passes --local_rank), under
SLURM or torchrun, and as a plain `python` process (then a one-rank group is made on loopback).

Shared memory. On CPUs, when every rank runs on one machine (LOCAL_SIZE == world size), DeepSpeed's shm
all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp, shm_initialize, run inside deepspeed.init_distributed) makes
one ~66 MB POSIX segment per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>,
maps every rank's, and never unlinks them. No pid in the name: uid, rendezvous address and port, rank.
init_distributed() removes them by name as soon as every rank has mapped them all (a barrier right after
init); the mappings stay valid and the memory goes back when the last rank ends, however it ends (normal
exit, exception, SIGTERM, SIGKILL). An atexit hook also unlinks this rank's segment for a failure between
DeepSpeed creating it and that barrier; only a SIGKILL inside that window (a second or so at start) can leave
one behind, and the next run on the machine removes segments of this uid that no process holds
(`remove_stale_shm`).
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import signal
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

log = logging.getLogger(__name__)

# the process group for host-side agreements: gloo; None = the default group (already gloo on CPUs)
_HOST: dict = {"group": None}


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
        remove_stale_shm()
        atexit.register(release_shm)
        deepspeed.init_distributed(timeout=timeout)
        if get_accelerator().device_name() == "cpu":
            # past this barrier every rank has mapped every rank's shm segment: the names can go
            dist.barrier()
            release_shm()
        elif dist.get_backend() != "gloo":
            # agreements the host makes (a signal, a setup failure) go over gloo with CPU tensors: over NCCL
            # each would be a device tensor read back, a host sync in every step
            _HOST["group"] = dist.new_group(backend="gloo", timeout=timeout)
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


def agree_max(value: int) -> int:
    """The largest of every rank's `value`, on every rank (one small all-reduce of a host tensor over gloo: no
    device sync). The stop check at each step boundary: a signal that reached only some ranks, or reached them
    inside different steps, still makes every rank stop after the same step."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    flag = torch.tensor([value], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_HOST["group"])
    return int(flag.item())


def reduce_min_(x: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise minimum over every rank of a device tensor (the first non-finite step)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise sum over every rank of a device tensor (logged scalars, expert counts)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_finite(x: torch.Tensor) -> bool:
    """Whether `x` is finite on every rank (a host read: train.on_nan=skip decides before backward)."""
    flag = (~torch.isfinite(x)).any().to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_main(value: float) -> float:
    """Rank 0's `value` on every rank (a host value: over gloo, no device sync)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    x = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(x, src=0, group=_HOST["group"])
    return x.item()


def all_ranks(value):
    """Every rank's `value` (anything picklable), in rank order, on every rank: one all_gather_object.
    How ranks agree on something only some of them know, e.g. which of them failed to write a checkpoint."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_HOST["group"])
    return values


def gather_to_main(value):
    """Every rank's `value` (anything picklable) on rank 0, in rank order; None on the other ranks. Over the host
    group, so a few MB of evaluation features never need a device copy."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0, group=_HOST["group"])
    return out


def barrier() -> None:
    """Every rank waits here for the others (host group); nothing to do in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_HOST["group"])


def first_failure(message: str | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank whose `message` is not None, on every rank; None when no rank has one.
    Once per run: the ranks agree that their setup succeeded."""
    return next(((rank, m) for rank, m in enumerate(all_ranks(message)) if m is not None), None)


# ---- DeepSpeed's CPU shared-memory segments (see the module docstring) -----------------------------------

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_segment(rank: int | None = None) -> Path:
    """The segment DeepSpeed's shm all-reduce makes for `rank` (default: this process's RANK) in this run."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    return SHM_DIR / (f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm() -> None:
    """Unlink this rank's segment if this process maps it under that name (it made it, or mapped the same file
    the name still holds). Idempotent; from init_distributed once all ranks mapped it, and at exit."""
    path = shm_segment()
    try:
        inode = _mapped_inodes(os.getpid()).get(str(path))
        if inode is not None and path.stat().st_ino == inode:
            path.unlink()
    except OSError:
        pass


def remove_stale_shm() -> list[Path]:
    """Remove DeepSpeed shm segments of this uid that no process has open or mapped: left by a run killed while
    it started (before init_distributed's barrier). A live run's segment is always held (its maker keeps the
    descriptor and the mapping from creation on), so it is never taken. "Held" is asked of the kernel, which
    grants a write lease only on a file no other process has open (a mapping counts): processes in other pid
    namespaces sharing this /dev/shm count too. Where leases are unavailable nothing is removed."""
    removed = []
    for path in SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"):
        if not _held(path):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    if removed:
        log.info("removed %d DeepSpeed shm segment(s) no process holds from %s: %s", len(removed), SHM_DIR,
                 ", ".join(p.name for p in removed))
    return removed


def _held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return True
    try:
        # a lease break (another process opening it in the next microseconds) would signal SIGIO, whose default
        # action ends the process: have it signal SIGURG instead, ignored by default
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError:         # EAGAIN: someone has it open; EINVAL, EACCES: cannot tell
        return True
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _mapped_inodes(pid: int | str) -> dict[str, int]:
    """DeepSpeed shm files mapped by `pid`: path -> inode (unlinked ones end in ' (deleted)')."""
    found = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if SHM_PREFIX in line:
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    found[fields[5].rstrip("\n")] = int(fields[4])
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# keys of a DeepSpeed JSON that the experiment config decides: the JSON holds engine settings only
# (precision, ZeRO, communication), so a value it sets for one of these could silently win over the config
_OWNED = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
          "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.grad_clip",
          "optimizer": "optim.* (engine/optim.py builds the optimizer)",
          "scheduler": "optim.schedule (engine/optim.py builds the schedule)"}


def deepspeed_config(config: Config, world_size: int, path: str | None = None) -> dict:
    """Read the DeepSpeed JSON and fill in the batch sizes and clipping from the experiment config.

    A key the experiment config owns (`_OWNED`) may appear in the JSON only with the config's value (or
    "auto"); anything else is a ConfigError naming the file, the key and the setting to use instead.
    """
    path = path or config.train.deepspeed_config
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config={path}: file does not exist") from None
    except ValueError as e:   # JSONDecodeError, or UnicodeDecodeError for a binary file
        raise ConfigError(f"train.deepspeed_config={path}: not valid JSON ({e})") from None
    except OSError as e:   # a folder, no permission
        raise ConfigError(f"train.deepspeed_config={path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config={path}: expected a JSON object, got {type(ds).__name__}")
    check(config, world_size)
    micro, accum = derive_batch(config, world_size)
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": config.train.global_batch, "gradient_clipping": config.optim.grad_clip}
    for key, owner in _OWNED.items():
        if key in ds and ds[key] != "auto" and (key not in want or ds[key] != want[key]):
            gives = (f" ({owner}={want[key]}; global batch {config.train.global_batch} = micro {micro} x "
                     f"accumulation {accum} x world {world_size})" if key in want else f" ({owner})")
            raise ConfigError(f"{path}: {key}={json.dumps(ds[key])} is set by the experiment config{gives}: "
                              f"remove {key} from the JSON and set {owner.split()[0]} instead")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        ds[key] = want[key]
    if config.optim.grad_clip > 0:
        ds["gradient_clipping"] = config.optim.grad_clip
    elif ds.get("gradient_clipping") == "auto":
        del ds["gradient_clipping"]   # off, as optim.grad_clip=0 says
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


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """DeepSpeed's default layout: expert-parallel groups are runs of `ep_size` consecutive ranks."""
    return rank % ep_size


def place_experts(model, seed: int, rank: int):
    """Give each MoE layer of `model` (from build_model: the slice of expert-parallel rank 0) the experts
    `rank` holds, with the weights a single process gives those global indices. Returns `model`."""
    for layer in model.moe_layers:
        ep_rank = expert_parallel_rank(rank, layer.ep_size)
        if ep_rank:
            layer.init_experts(seed, ep_rank)
    return model


def _check_expert_layout(model, info: DistInfo) -> None:
    """The experts were placed for `rank % ep_size`; make sure DeepSpeed grouped ranks that way."""
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
