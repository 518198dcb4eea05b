"""The trainer as one state object: what the loop and its hooks share, and what a checkpoint keeps of it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mfrnet_ds.config import Config
from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.trainer.setup import SAMPLER, BatchPlan, seed_everything

log = logging.getLogger("mfrnet_ds.train")


@dataclass
class Trainer:
    config: Config
    info: D.DistInfo
    plan: BatchPlan
    manifest: dict
    engine: object
    ds_config: dict
    dtype: torch.dtype
    layout: dict                 # ckpt.layout: a resume under another one restores the weights only
    tracker: object = None
    # client state, saved in every checkpoint
    step: int = 0
    best_map: float = -1.0
    best: dict = field(default_factory=dict)
    run_id: str | None = None
    # this process only
    end: int = 0                 # the step training stops after: the last one, or train.max_steps
    metrics: dict = field(default_factory=dict)   # the latest evaluation
    evaluated: int | None = None                  # its step
    stopping: int = 0            # the signal every rank agreed to stop on (0: none)
    parts: dict = field(default_factory=dict)     # the latest step's loss parts, on the device
    window: dict = field(default_factory=dict)    # samples and start time since the last log line
    bar: object = None                            # this epoch's progress bar

    @property
    def out_dir(self) -> Path:
        return Path(self.config.train.out_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def client_state(self) -> dict:
        # the config lets `mfrnet_ds.export` rebuild the model
        return {"step": self.step, "best_map": self.best_map, "best": self.best, "run_id": self.run_id,
                "config": self.config.to_dict(), "layout": self.layout, "sampler": SAMPLER}

    def eval_kwargs(self) -> dict:
        c, info = self.config, self.info
        return dict(img_size=c.model.img_size, batch_size=c.data.eval_batch, rank=info.rank,
                    world_size=info.world_size, device=info.device, num_workers=c.data.num_workers,
                    progress=info.is_main, dtype=self.dtype, re_ranking=c.data.re_ranking,
                    max_damaged_share=c.data.max_damaged_share)

    def restore(self, tag: str) -> None:
        """Collective: the engine, the RNGs and the client state of checkpoint `tag`."""
        client = ckpt.load(self.engine, self.ckpt_dir, tag, self.info.rank, self.layout)
        for key in ("step", "best_map", "best", "run_id"):
            if key in client:
                setattr(self, key, client[key])
        if client.get("layout") != self.layout:   # no RNG state for this layout: a fresh stream per step
            seed_everything(self.config.train.seed * 1000 + self.info.rank + 7919 * self.step)
        if self.info.is_main:
            log.info("resumed from %s at step %d", self.ckpt_dir / tag, self.step)
            if client.get("sampler") != SAMPLER:
                log.warning("%s was written by a trainer that drew a P x K batch per rank; the weights, optimizer "
                            "and step are restored, and from here on every step draws one global P x K batch "
                            "(mining and BNNeck over all ranks), so the data order differs from the run it "
                            "continues", self.ckpt_dir / tag)
