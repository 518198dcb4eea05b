"""The training loop: P x K batches -> train_step (engine/step.py) -> the hooks that are due, with the run's
state in one Trainer object. Setup before it (trainer/setup.py), periodic work in trainer/hooks.py, the
end-of-run files in trainer/finish.py."""
from __future__ import annotations

import json
import logging
import signal
import time

import torch
from tqdm import tqdm

from mfrnet_ds.config import Config
from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.build import build_engine
from mfrnet_ds.engine.step import FiniteGuard, StepSettings, train_step
from mfrnet_ds.stream.pipeline import train_loader
from mfrnet_ds.tracking.start import start_tracking
from mfrnet_ds.trainer.hooks import end_hooks, epoch_hooks, evaluate, save, step_hooks
from mfrnet_ds.trainer.setup import log_start, prepare, seed_everything
from mfrnet_ds.trainer.signals import StopSignals, StoppedBySignal
from mfrnet_ds.trainer.state import Trainer

log = logging.getLogger("mfrnet_ds.train")


def train(config: Config, info: D.DistInfo, resume: bool = False) -> dict:
    """Train (or resume) a run in `config.train.out_dir`; returns the final metrics on rank 0."""
    config, manifest, ds_config, plan, model, found = prepare(config, info, resume)
    engine = build_engine(model, config, info, ds_config, plan.total_steps, plan.warmup_steps, plan.steps_per_epoch,
                          config.train.epochs, compile=config.train.compile)
    # Dropout, gate noise and random token selection draw from the global RNGs: one stream per rank,
    # fixed by the seed (a resume then restores them from the checkpoint).
    seed_everything(config.train.seed * 1000 + info.rank)
    t = Trainer(config, info, plan, manifest, engine, ds_config, D.engine_dtype(engine),
                ckpt.layout(engine, info.world_size))
    if found is not None:
        t.restore(found)
    t.tracker = start_tracking(config, info, manifest, ds_config, t.run_id)
    if info.is_main:
        t.out_dir.mkdir(parents=True, exist_ok=True)
        (t.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (t.out_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        t.run_id = t.tracker.run_id
        log_start(config, info, plan, manifest, model)
    # SIGTERM/SIGINT from here on: noted, and training stops at the next step boundary on every rank
    with StopSignals() as stop:
        try:
            _run(t, stop)
        except BaseException:
            t.tracker.close("FAILED")
            raise
        _close(t)
    return t.metrics


def _run(t: Trainer, stop: StopSignals) -> None:
    if t.config.train.eval_first and t.step == 0:
        evaluate(t, keep_best=False)
        if t.info.is_main:
            (t.out_dir / "metrics_untrained.json").write_text(json.dumps(t.metrics, indent=2))
    spe = t.plan.steps_per_epoch
    t.end = min(t.plan.total_steps, t.config.train.max_steps or t.plan.total_steps)
    batches = _train_batches(t) if t.step < t.end else iter(())
    after_step, after_epoch = step_hooks(t), epoch_hooks(t)
    while t.step < t.end:
        _train_epoch(t, batches, stop, after_step)
        if t.stopping or t.step % spe:   # a signal, or max_steps inside an epoch
            break
        for hook in after_epoch:
            if hook.due(t, t.step // spe):
                hook.fn(t)
    if t.stopping or t.step < t.plan.total_steps:     # stopped early: a signal or train.max_steps
        _stop_early(t)


def _train_batches(t: Trainer):
    """The batches of steps step+1..end and on to the end of that epoch, from one loader whose workers live
    through every epoch. Each is this rank's share of one global P x K batch: its slice of every micro step
    (see stream/)."""
    c, info, plan = t.config, t.info, t.plan
    first, in_epoch = divmod(t.step, plan.steps_per_epoch)
    loader = train_loader(c.data.shards, global_batch=c.train.global_batch, num_instances=c.data.num_instances,
                          img_size=c.model.img_size, batches_per_epoch=plan.steps_per_epoch,
                          num_workers=c.data.num_workers, seed=c.train.seed, epoch=first, rank=info.rank,
                          world_size=info.world_size, accum=plan.accum, start_batch=in_epoch,
                          aligned=c.data.aligned_augment, pin_memory=info.device.type == "cuda",
                          epochs=-(-t.end // plan.steps_per_epoch) - first, pool_factor=c.data.pool_factor)
    with torch.random.fork_rng(devices=[]):   # starting the loader must not move the training RNG (resume)
        return iter(loader)


def _train_epoch(t: Trainer, batches, stop: StopSignals, hooks) -> None:
    """Steps to the end of this epoch, train.max_steps or an agreed stop, each followed by the hooks due."""
    spe, c = t.plan.steps_per_epoch, t.config
    t.bar = tqdm(total=spe, initial=t.step % spe, desc=f"epoch {t.step // spe + 1}/{c.train.epochs}",
                 disable=not t.info.is_main, dynamic_ncols=True)
    t.engine.train()
    how = StepSettings(micro=t.plan.micro, accum=t.plan.accum, device=t.info.device, dtype=t.dtype, loss=c.loss,
                       on_nan=c.train.on_nan)
    guard = FiniteGuard(t.info.device)
    t.window = {"t0": time.perf_counter(), "samples": 0}
    for batch in batches:
        t.parts = train_step(t.engine, batch, how, t.step + 1, guard)
        t.window["samples"] += batch["images"].shape[0] * t.info.world_size
        t.step += 1
        t.bar.update(1)
        t.stopping = stop.check()   # every rank, every step: one tiny host all-reduce
        due = [hook for hook in hooks if hook.due(t, t.step)]
        last_of_epoch = t.step % spe == 0 or t.step == t.end or bool(t.stopping)
        if due or last_of_epoch:
            guard.check()   # the device flag, read where the step's results are read anyway
        for hook in due:
            hook.fn(t)
        if last_of_epoch:
            break
    t.bar.close()


def _stop_early(t: Trainer) -> None:
    """A run stopped before its last step, by train.max_steps or a signal: the checkpoint first (after a signal
    the launcher allows its ranks 30 s before SIGKILL), then, with train.eval_on_stop, the final evaluation
    (after a signal: full modalities only). It is a record, not a candidate for the best checkpoint."""
    c = t.config
    why = signal.Signals(t.stopping).name if t.stopping else f"train.max_steps={c.train.max_steps}"
    if t.info.is_main:
        log.info("stopping after step %d (%s): saving a checkpoint", t.step, why)
    tag = save(t)
    if c.train.eval_on_stop and t.evaluated != t.step:
        evaluate(t, missing_too=c.train.eval_missing and not t.stopping, keep_best=False)
    if t.info.is_main:
        log.info("stopped after step %d (%s); checkpoint %s; --resume continues the run", t.step, why,
                 t.ckpt_dir / tag)


def _close(t: Trainer) -> None:
    # the latest evaluation; a stop without one (train.eval_on_stop=false) keeps the file it has
    if t.info.is_main and (t.metrics or not (t.out_dir / "metrics.json").exists()):
        (t.out_dir / "metrics.json").write_text(json.dumps(t.metrics, indent=2))
    if t.stopping:
        # not finished: the resumed run finalises (no export or plots inside the launcher's grace period)
        t.tracker.close("KILLED")
        # a barrier: rank 0's files are written before any rank exits (a launcher stops all when one exits)
        D.agree_max(0)
        raise StoppedBySignal(t.stopping, t.step)
    if t.info.is_main:
        for hook in end_hooks(t):
            hook.fn(t)
    t.tracker.close("FINISHED")
