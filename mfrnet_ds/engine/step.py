"""One training step, top to bottom. The loop (trainer/loop.py) calls it once per global batch, and so do
bench/train_step.py and tests/scripts/ep_equivalence.py: what they measure is what trains.

A step takes this rank's share of one global P x K batch ({"images": (accum x micro, 3, 3, H, W) uint8 or
float, "erase", "camids", "labels"}) and, for each micro step: moves its rows to the device (normalising uint8
images and filling the erased blocks there), forwards them, computes the
losses over the whole global micro batch (`step_losses`), backs them up, and lets DeepSpeed step (the
optimizer steps after the last micro step).

No host syncs. Nothing in a micro step reads a device value back, so the host queues the next micro step while
the device still runs this one. A non-finite loss is noted in a device flag (`FiniteGuard`) that the loop reads
where it reads anything anyway: at logging, checkpoint, evaluation and the end (`train.on_nan=stop`, the
default). `train.on_nan=skip` is the exception: whether to skip must be known before backward (backward
through a non-finite loss would put NaN into the accumulated gradients and the Adam moments), so that mode
reads one flag per micro step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mfrnet_ds.config import LossConfig
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.loss import compute_losses
from mfrnet_ds.stream.augment import erase_

log = logging.getLogger("mfrnet_ds.train")

PARTS = ("loss", "loss_id", "loss_tri", "loss_aux")
_NEVER = 2 ** 62   # "no non-finite step yet"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class StepSettings:
    micro: int              # samples per rank per micro step
    accum: int              # micro steps per optimizer step
    device: torch.device
    dtype: torch.dtype      # the engine's compute dtype (bf16 under a bf16 DeepSpeed config)
    loss: LossConfig
    on_nan: str = "stop"    # "stop" | "skip"


def train_step(engine, batch: dict, how: StepSettings, step: int, guard: FiniteGuard) -> dict[str, torch.Tensor]:
    """One optimizer step (`step`: its 1-based number, for messages). Returns the loss parts of the last micro
    step as device tensors: read them only when logging."""
    skipped = False
    for i in range(how.accum):
        rows = slice(i * how.micro, (i + 1) * how.micro)
        images = device_images(batch["images"][rows], how.device, how.dtype)
        erase_(images, [(r - rows.start, *box) for r, *box in batch.get("erase", ()) if rows.start <= r < rows.stop])
        camids = batch["camids"][rows].to(how.device, non_blocking=True)
        labels = batch["labels"][rows].to(how.device, non_blocking=True)
        parts = step_losses(engine, images, camids, labels, how.loss)
        loss = parts["loss"]
        if how.on_nan == "skip" and not D.all_finite(loss):
            _warn_skipped(parts, step)
            # backward and step still run on every rank, so DeepSpeed's accumulation and gradient reduction stay
            # in step: a zero loss over every parameter now, and a zero learning rate at the boundary
            loss = sum(p.view(-1)[0] * 0 for p in engine.module.parameters() if p.requires_grad)
            skipped = True
        else:
            guard.note(parts, step)
        engine.backward(loss)
        if skipped and i == how.accum - 1:
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0   # the scheduler sets the next step's lrs again inside engine.step()
        engine.step()
    return parts


def step_losses(model, images: torch.Tensor, camids: torch.Tensor, labels: torch.Tensor, cfg: LossConfig) -> dict:
    """Forward this rank's slice of a global micro batch -> the loss parts of the WHOLE global micro batch.

    Mining and BNNeck see every rank's features (gathered; gradients flow back to the rank that made them),
    so the losses, and with DeepSpeed's gradient averaging the update, do not depend on the number of
    ranks. `model` is a DeepSpeed engine or a plain MFRNet."""
    out = model(images, camids)
    features = [D.gather_batch(f) for f in out.features]
    logits = getattr(model, "module", model).classify(features)
    return compute_losses(logits, features, D.gather_batch(labels), out.aux_loss, cfg)


def device_images(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch of images on the device in the compute dtype. uint8 images (a quarter of float32's bytes over
    PCIe) are normalised there: x / 127.5 - 1, the loader's Normalize(0.5, 0.5) of x / 255, in fp32."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().mul_(1 / 127.5).sub_(1.0)
    return images.to(dtype)


class FiniteGuard:
    """The first step whose loss was not finite, kept on the device; `check()` reads it (a collective, so every
    rank raises NonFiniteLoss at the same boundary, also when only one rank's aux loss overflowed)."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), _NEVER, dtype=torch.int64, device=device)
        self.parts = torch.zeros(len(PARTS), device=device)     # the loss parts of that micro step

    def note(self, parts: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([parts[k].detach().float() for k in PARTS])
        new = ~torch.isfinite(values[0]) & (self.first == _NEVER)
        self.parts = torch.where(new, values, self.parts)
        self.first.masked_fill_(new, step)

    def check(self) -> None:
        first = int(D.reduce_min_(self.first.clone()).item())
        if first != _NEVER:
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(PARTS, self.parts.tolist()))
            raise NonFiniteLoss(f"non-finite loss at step {first}: {values}; the run stops before it checkpoints "
                                f"the damaged weights (set train.on_nan=skip to skip such batches)")


def _warn_skipped(parts: dict[str, torch.Tensor], step: int) -> None:
    if D.is_main():
        values = ", ".join(f"{k}={parts[k].item():.4g}" for k in PARTS)
        log.warning("non-finite loss at step %d: %s; this step's update is skipped", step, values)
