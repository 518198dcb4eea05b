"""Before the first step: what the run trains on (manifest, plan, DeepSpeed JSON), agreed by every rank, and
the state a resume starts from."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mfrnet_ds.config import Config, ConfigError, MissingFileError, UserError, derive_batch
from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.model import build_model
from mfrnet_ds.stream.pipeline import read_manifest

log = logging.getLogger("mfrnet_ds.train")


# How batches are drawn; saved in checkpoints so a resume can tell a run that drew them another way.
SAMPLER = "global-pk-v1"


class SetupError(UserError):
    """A user error before training (missing shards or manifest, DeepSpeed JSON, pretrained weights, nothing to
    --resume): raised on EVERY rank at the same point, with the message of the lowest rank that met it."""


@dataclass
class BatchPlan:
    """How a run's global batch is cut and how many steps it takes (not the capacity plan of mfrnet_ds.plan)."""
    micro: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def with_dataset(config: Config, manifest: dict) -> Config:
    """Take the classifier size and camera count from the shard manifest where the config leaves them open."""
    m = config.model
    num_classes = m.num_classes if m.num_classes is not None else manifest["num_classes"]
    if num_classes != manifest["num_classes"]:
        raise ConfigError(f"model.num_classes={num_classes} but the shards hold {manifest['num_classes']} "
                          f"training identities")
    if manifest["num_cameras"] > m.num_cameras:
        raise ConfigError(f"model.num_cameras={m.num_cameras} but the shards use {manifest['num_cameras']} cameras")
    img = tuple(manifest["image_size"])
    if tuple(m.img_size) != img:
        log.warning("model.img_size=%s differs from the dataset's native %s: images are resized", m.img_size, img)
    return replace(config, model=replace(m, num_classes=num_classes))


def make_plan(config: Config, manifest: dict, world_size: int) -> BatchPlan:
    micro, accum = derive_batch(config, world_size)
    t = config.train
    spe = t.steps_per_epoch or max(1, manifest["splits"]["train"]["num_samples"] // t.global_batch)
    return BatchPlan(micro, accum, spe, spe * t.epochs, spe * config.optim.warmup_epochs)


def resume_tag(ckpt_dir: Path) -> str:
    found = ckpt.read_pointer(ckpt_dir, "latest")
    if found is None:
        raise MissingFileError(f"--resume: no complete checkpoint under {ckpt_dir} (a 'latest' file naming a "
                               f"step folder with COMPLETE); start without --resume, or check train.out_dir")
    return found


def agree_on_setup(failure: UserError | None) -> None:
    """Collective: raise SetupError on every rank when any rank failed its setup (the lowest rank's message)."""
    first = D.first_failure(None if failure is None else str(failure))
    if first is not None:
        rank, message = first
        raise SetupError(message if rank == 0 else f"rank {rank}: {message}") from failure


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(config: Config, info: D.DistInfo, resume: bool):
    """(config, manifest, DeepSpeed config, plan, model, checkpoint tag to resume or None), on every rank.

    What a user can get wrong is read before the first collective, then the ranks agree on it: a mistake
    any rank meets stops every rank at this point with one message (SetupError), never a hang."""
    failure = None
    try:
        manifest = read_manifest(config.data.shards)
        config = with_dataset(config, manifest)
        ds_config = D.deepspeed_config(config, info.world_size)
        plan = make_plan(config, manifest, info.world_size)
        model = D.place_experts(build_model(config), config.train.seed, info.rank)
        found = resume_tag(Path(config.train.out_dir) / "checkpoints") if resume else None
    except UserError as e:
        failure = e
    agree_on_setup(failure)
    return config, manifest, ds_config, plan, model, found


def log_start(config, info, plan, manifest, model):
    n_params = sum(p.numel() for p in model.parameters())
    log.info("world %d | %s: %d train samples, %d ids, %d cameras | global batch %d = micro %d x accum %d x world %d"
             " | %d steps/epoch x %d epochs | %.2fM params on rank 0",
             info.world_size, manifest["dataset"], manifest["splits"]["train"]["num_samples"],
             manifest["num_classes"], manifest["num_cameras"], config.train.global_batch, plan.micro, plan.accum,
             info.world_size, plan.steps_per_epoch, config.train.epochs, n_params / 1e6)
