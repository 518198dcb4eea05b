"""The training loop: P x K batches -> forward -> losses -> backward -> step, with logging, evaluation
and checkpoints around it. One obvious path from batch to step; periodic work in small functions."""
from __future__ import annotations

import atexit
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mfrnet_ds.config import Config, ConfigError, MissingFileError, UserError, derive_batch
from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.optim import build_optimizer, build_scheduler, param_groups
from mfrnet_ds.engine.step import FiniteGuard, StepSettings, train_step
from mfrnet_ds.eval.embed import evaluate_settings, format_table
from mfrnet_ds.eval.health import collapse_warning
from mfrnet_ds.eval.pixel import pixel_baseline
from mfrnet_ds.model import MISSING_SETTINGS, build_model
from mfrnet_ds.shards import manifest_protocol
from mfrnet_ds.stream.pipeline import read_manifest, train_loader
from mfrnet_ds.tracking.start import start_tracking
from mfrnet_ds.tracking.finish import finalize_run

log = logging.getLogger("mfrnet_ds.train")


# How batches are drawn; saved in checkpoints so a resume can tell a run that drew them another way.
SAMPLER = "global-pk-v1"


class SetupError(UserError):
    """A user error before training (missing shards or manifest, DeepSpeed JSON, pretrained weights, nothing to
    --resume): raised on EVERY rank at the same point, with the message of the lowest rank that met it."""


class StoppedBySignal(Exception):
    """train() stopped on SIGTERM/SIGINT at a step boundary, after its checkpoint (and, with train.eval_on_stop,
    its evaluation): the run is not finished and `--resume` continues it. Exit status 128 + the signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class Plan:
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


def make_plan(config: Config, manifest: dict, world_size: int) -> Plan:
    micro, accum = derive_batch(config, world_size)
    t = config.train
    spe = t.steps_per_epoch or max(1, manifest["splits"]["train"]["num_samples"] // t.global_batch)
    return Plan(micro, accum, spe, spe * t.epochs, spe * config.optim.warmup_epochs)


def train(config: Config, info: D.DistInfo, resume: bool = False, ds_config_path: str | None = None) -> dict:
    """Train (or resume) a run in `config.train.out_dir`; returns the final metrics on rank 0."""
    out_dir = Path(config.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    # What a user can get wrong is read before the first collective, then the ranks agree on it: a mistake
    # any rank meets stops every rank at this point with one message (SetupError), never a hang.
    failure = None
    try:
        manifest = read_manifest(config.data.shards)
        config = with_dataset(config, manifest)
        ds_config = D.deepspeed_config(config, info.world_size, ds_config_path)
        plan = make_plan(config, manifest, info.world_size)
        model = D.place_experts(build_model(config), config.train.seed, info.rank)
        found = _resume_tag(ckpt_dir) if resume else None
    except UserError as e:
        failure = e
    _agree_on_setup(failure)

    if config.train.compile == "on" or (config.train.compile == "auto" and info.device.type == "cuda"):
        model.compile_dense_blocks()
    groups = param_groups(model, config.optim)
    engine = D.initialize(model, build_optimizer(groups, config.optim, info.device),
                          build_scheduler(plan.total_steps, plan.warmup_steps, config.optim,
                                                  plan.steps_per_epoch, config.train.epochs), ds_config, info)
    dtype = D.engine_dtype(engine)

    # Dropout, gate noise and random token selection draw from the global RNGs: one stream per rank,
    # fixed by the seed (a resume then restores them from the checkpoint).
    seed_everything(config.train.seed * 1000 + info.rank)
    # client state saved in every checkpoint; the config lets `mfrnet_ds.export` rebuild the model
    state = {"step": 0, "best_map": -1.0, "best": {}, "run_id": None, "config": config.to_dict(),
             "layout": ckpt.layout(engine, info.world_size), "sampler": SAMPLER}
    if resume:
        client = ckpt.load(engine, ckpt_dir, found, info.rank, state["layout"])
        state.update({k: client[k] for k in ("step", "best_map", "best", "run_id") if k in client})
        if client.get("layout") != state["layout"]:   # no RNG state for this layout: a fresh stream per step
            seed_everything(config.train.seed * 1000 + info.rank + 7919 * state["step"])
        if info.is_main:
            log.info("resumed from %s at step %d", ckpt_dir / found, state["step"])
            if client.get("sampler") != SAMPLER:
                log.warning("%s was written by a trainer that drew a P x K batch per rank; the weights, optimizer "
                            "and step are restored, and from here on every step draws one global P x K batch "
                            "(mining and BNNeck over all ranks), so the data order differs from the run it "
                            "continues", ckpt_dir / found)

    tracker = start_tracking(config, info, manifest, ds_config, state.get("run_id"))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (out_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        state["run_id"] = tracker.run_id
        _log_start(config, info, plan, manifest, model)

    eval_kw = dict(img_size=config.model.img_size, batch_size=config.data.eval_batch, rank=info.rank,
                   world_size=info.world_size, device=info.device, num_workers=config.data.num_workers,
                   progress=info.is_main, dtype=dtype, re_ranking=config.data.re_ranking)
    metrics, evaluated = {}, None      # evaluated: the step of the latest evaluation
    # SIGTERM/SIGINT from here on: noted, and training stops at the next step boundary on every rank
    with _StopSignals() as stop:
        try:
            if config.train.eval_first and state["step"] == 0:
                metrics = _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir,
                                    missing_too=False, keep_best=False)
                if info.is_main:
                    (out_dir / "metrics_untrained.json").write_text(json.dumps(metrics, indent=2))
            end = min(plan.total_steps, config.train.max_steps or plan.total_steps)
            batches = _train_batches(config, info, plan, state["step"], end) if state["step"] < end else iter(())
            while state["step"] < end:
                epoch = state["step"] // plan.steps_per_epoch
                _train_epoch(engine, batches, config, info, plan, state, epoch, end, dtype, tracker, ckpt_dir,
                             stop=stop)
                if stop.agreed or state["step"] % plan.steps_per_epoch:   # a signal, or max_steps inside an epoch
                    break
                last = epoch + 1 == config.train.epochs
                if last or (epoch + 1) % config.train.eval_every == 0:
                    metrics = _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir,
                                        missing_too=last and config.train.eval_missing,
                                        steps_per_epoch=plan.steps_per_epoch)
                    evaluated = state["step"]
                if config.train.ckpt_every == 0 or last:
                    _save(engine, ckpt_dir, state, info)
            if stop.agreed or state["step"] < plan.total_steps:     # stopped early: a signal or train.max_steps
                metrics = _stop_early(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir,
                                      stop.agreed, metrics, evaluated)
        except BaseException:
            tracker.close("FAILED")
            raise
        # the latest evaluation; a stop without one (train.eval_on_stop=false) keeps the file it has
        if info.is_main and (metrics or not (out_dir / "metrics.json").exists()):
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if stop.agreed:
            # not finished: the resumed run finalises (no export or plots inside the launcher's grace period)
            tracker.close("KILLED")
            # a barrier: rank 0's files are written before any rank exits (a launcher stops all when one exits)
            D.agree_max(0)
            raise StoppedBySignal(stop.agreed, state["step"])
        if info.is_main:
            finalize_run(tracker, out_dir=out_dir, ckpt_dir=ckpt_dir, shards=config.data.shards, manifest=manifest,
                         config=config)
        tracker.close("FINISHED")
    return metrics


def _resume_tag(ckpt_dir: Path) -> str:
    found = ckpt.read_pointer(ckpt_dir, "latest")
    if found is None:
        raise MissingFileError(f"--resume: no complete checkpoint under {ckpt_dir} (a 'latest' file naming a "
                               f"step folder with COMPLETE); start without --resume, or check train.out_dir")
    return found


def _agree_on_setup(failure: UserError | None) -> None:
    """Collective: raise SetupError on every rank when any rank failed its setup (the lowest rank's message)."""
    first = D.first_failure(None if failure is None else str(failure))
    if first is not None:
        rank, message = first
        raise SetupError(message if rank == 0 else f"rank {rank}: {message}") from failure


class _StopSignals:
    """SIGTERM and SIGINT, while training: noted, and acted on at the next step boundary, where the ranks agree
    (D.agree_max) so that every rank stops after the same step, also when the signal reached only some of them
    or reached them in different steps. A second SIGINT interrupts at once (KeyboardInterrupt).

    The main thread blocks both signals (a handler notes them when another thread takes one; the step boundary
    also collects one left pending), and DataLoader workers, forked from it, inherit the block: torch's worker
    handler makes a worker die of a SIGTERM that is not its rank's, and its rank would then raise ("DataLoader
    worker ... is killed by signal") wherever it is instead of saving. A scheduler, `kill -TERM -PGID` and
    DeepSpeed's launcher (terminate_process_tree) all signal the workers too. Loaders end their workers
    without signals; an exit hook ends those an exception left behind (_end_workers_at_exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0     # the first signal this process got (0: none)
        self.agreed = 0       # the signal every rank stopped on (0: none)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal.signal works only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
            atexit.unregister(_end_workers_at_exit)    # once, and after multiprocessing's (LIFO)
            atexit.register(_end_workers_at_exit)
        return self

    def __exit__(self, *exc):
        if self._previous:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)   # one still pending reaches _handle
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}

    def _handle(self, signum, frame=None):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.received:
            self.received = signum
            # os.write: logging is not safe inside a signal handler
            os.write(2, f"rank {os.environ.get('RANK', '0')}: {signal.Signals(signum).name} received: stopping "
                        f"after this step with a checkpoint\n".encode())

    def check(self) -> int:
        """Collective, at every step boundary on every rank: the signal to stop on, 0 to go on."""
        if self._previous and not self.received:
            pending = signal.sigpending() & set(self.SIGNALS)   # blocked in every thread: still pending
            if pending:
                self._handle(signal.sigwait(pending))
        self.agreed = D.agree_max(self.received)
        return self.agreed


def _end_workers_at_exit() -> None:
    """At exit, SIGKILL the DataLoader workers still alive: those of a loader an exception left behind (its
    traceback holds it). They block SIGTERM (_StopSignals), so multiprocessing's own exit hook, which
    SIGTERMs its daemonic children and then joins them, would wait forever. Runs before that hook (LIFO)."""
    import multiprocessing
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # torch's handler would raise for each
        for p in workers:
            p.kill()
        for p in workers:
            p.join(timeout=10)


def _stop_early(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir, signum, metrics, evaluated):
    """A run stopped before its last step, by train.max_steps or a signal: the checkpoint first (after a signal
    the launcher allows its ranks 30 s before SIGKILL), then, with train.eval_on_stop, the final evaluation
    (after a signal: full modalities only). It is a record, not a candidate for the best checkpoint."""
    why = signal.Signals(signum).name if signum else f"train.max_steps={config.train.max_steps}"
    if info.is_main:
        log.info("stopping after step %d (%s): saving a checkpoint", state["step"], why)
    tag = _save(engine, ckpt_dir, state, info)
    if config.train.eval_on_stop and evaluated != state["step"]:
        metrics = _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir,
                            missing_too=config.train.eval_missing and not signum, keep_best=False)
    if info.is_main:
        log.info("stopped after step %d (%s); checkpoint %s; --resume continues the run", state["step"], why,
                 ckpt_dir / tag)
    return metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train_batches(config, info, plan, step: int, end: int):
    """The batches of steps step+1..end and on to the end of that epoch, from one loader whose workers live
    through every epoch. Each is this rank's share of one global P x K batch: its slice of every micro step
    (see stream/)."""
    first, in_epoch = divmod(step, plan.steps_per_epoch)
    loader = train_loader(config.data.shards, global_batch=config.train.global_batch,
                          num_instances=config.data.num_instances, img_size=config.model.img_size,
                          batches_per_epoch=plan.steps_per_epoch, num_workers=config.data.num_workers,
                          seed=config.train.seed, epoch=first, rank=info.rank, world_size=info.world_size,
                          accum=plan.accum, start_batch=in_epoch, aligned=config.data.aligned_augment,
                          pin_memory=info.device.type == "cuda", epochs=-(-end // plan.steps_per_epoch) - first,
                          pool_factor=config.data.pool_factor)
    with torch.random.fork_rng(devices=[]):   # starting the loader must not move the training RNG (resume)
        return iter(loader)


def _train_epoch(engine, batches, config, info, plan, state, epoch, end, dtype, tracker, ckpt_dir, stop=None):
    in_epoch = state["step"] % plan.steps_per_epoch
    bar = tqdm(total=plan.steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{config.train.epochs}",
               disable=not info.is_main, dynamic_ncols=True)
    engine.train()
    how = StepSettings(micro=plan.micro, accum=plan.accum, device=info.device, dtype=dtype, loss=config.loss,
                       on_nan=config.train.on_nan)
    guard = FiniteGuard(info.device)
    window = {"t0": time.perf_counter(), "samples": 0}
    for batch in batches:
        parts = train_step(engine, batch, how, state["step"] + 1, guard)
        window["samples"] += batch["images"].shape[0] * info.world_size
        state["step"] += 1
        bar.update(1)
        stopping = stop is not None and stop.check()   # every rank, every step: one tiny host all-reduce
        logging_step = state["step"] % config.train.log_every == 0 or state["step"] == end or stopping
        saving = config.train.ckpt_every and state["step"] % config.train.ckpt_every == 0
        last_of_epoch = state["step"] % plan.steps_per_epoch == 0 or state["step"] == end or stopping
        if logging_step or saving or last_of_epoch:
            guard.check()   # the device flag, read where the step's results are read anyway
        if logging_step:
            _log_step(engine, parts, state, window, info, tracker, bar, Path(config.train.out_dir))
        if saving:
            _save(engine, ckpt_dir, state, info)
        if last_of_epoch:
            break
    bar.close()


def _log_step(engine, parts, state, window, info, tracker, bar, out_dir: Path):
    elapsed = time.perf_counter() - window["t0"]
    moe = engine.module.moe_stats()
    # One vector, summed over the ranks in one all-reduce and read back in one transfer: the loss parts and, per
    # layer, the dropped fraction and the balance loss (DeepSpeed's, from this rank's tokens), all averaged over
    # the ranks, then every layer's expert counts, summed (each rank routes its own tokens).
    averaged = [v.detach().float() for v in parts.values()]
    for s in moe.values():
        averaged += [s["dropped"].float(), s["balance"].float()]
    flat = D.reduce_sum_(torch.cat([torch.stack(averaged), *[s["counts"].float() for s in moe.values()]]))
    if not info.is_main:
        window.update(t0=time.perf_counter(), samples=0)
        return
    values = flat.tolist()
    means = [v / info.world_size for v in values[:len(averaged)]]
    counts = values[len(averaged):]
    metrics = dict(zip(parts, means))
    metrics["lr"] = engine.get_lr()[0]
    grad_norm = engine.get_global_grad_norm()   # DeepSpeed computes it where it clips (train.grad_clip > 0)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["samples_per_s"] = window["samples"] / max(elapsed, 1e-9)
    loads = []
    per_layer = means[len(parts):]
    for i, (name, s) in enumerate(moe.items()):
        c = counts[:len(s["counts"])]
        counts = counts[len(s["counts"]):]
        share = [x / max(sum(c), 1) for x in c]
        d, balance = per_layer[2 * i], per_layer[2 * i + 1]
        metrics.update({f"expert_load/{name}/{e}": x for e, x in enumerate(share)})
        metrics[f"dropped/{name}"] = d
        metrics[f"balance/{name}"] = balance
        loads.append(f"{name}[{' '.join(f'{x:.2f}' for x in share)}] drop {d:.2f}")
    tracker.log_metrics(metrics, state["step"])
    # a run that started offline gets its id when the store comes back: checkpoints then resume that run
    state["run_id"] = tracker.run_id or state["run_id"]
    with open(out_dir / "train_log.jsonl", "a") as f:   # plain-text record next to the tracker's
        f.write(json.dumps({"step": state["step"], "time": time.time(), **metrics}) + "\n")
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
    bar.write(f"step {state['step']:>6} loss {metrics['loss']:.4f} (id {metrics['loss_id']:.4f} "
              f"tri {metrics['loss_tri']:.4f} aux {metrics['loss_aux']:.4f}) lr {metrics['lr']:.2e} "
              f"{metrics['samples_per_s']:.1f} samples/s | " + " | ".join(loads))
    window.update(t0=time.perf_counter(), samples=0)


def _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir, missing_too, keep_best=True,
              steps_per_epoch=1):
    settings = [""] + (list(MISSING_SETTINGS) if missing_too and manifest_protocol(manifest).evaluates_missing
                           else [])
    # A split damaged beyond data.max_damaged_share raises DamagedSplitError on every rank: the run stops.
    results = evaluate_settings(engine, config.data.shards, manifest, settings,
                                **{"max_damaged_share": config.data.max_damaged_share, **eval_kw})
    metrics = {}
    if info.is_main:
        for missing, r in results.items():
            suffix = f"_missing_{missing}" if missing else ""
            # the damaged counts belong to the data, not the setting: logged once, also when 0
            metrics.update({f"{k}{suffix}" if not k.startswith("damaged_") else k: v for k, v in r.items()})
        if metrics.get("damaged_query") or metrics.get("damaged_gallery"):
            log.warning("evaluation at step %d left out damaged samples: %d of the query, %d of the gallery "
                        "(the reader's warnings name their shards)", state["step"], metrics["damaged_query"],
                        metrics["damaged_gallery"])
        # the trivial baseline beside every evaluation (cached per shard set: computed once)
        pixel = pixel_baseline(config.data.shards, manifest, config.model.img_size,
                               batch_size=config.data.eval_batch, num_workers=config.data.num_workers)
        metrics.update({f"pixel_{k}": v for k, v in pixel.items()})
        tracker.log_metrics(metrics, state["step"])
        with open(Path(config.train.out_dir) / "eval_log.jsonl", "a") as f:
            f.write(json.dumps({"step": state["step"], "time": time.time(), **metrics}) + "\n")
        log.info("evaluation at step %d:\n%s", state["step"], format_table(results, pixel))
        warning = collapse_warning(results[""])
        if warning and state["step"] > 0:
            log.warning("step %d: %s", state["step"], warning)
    best = D.broadcast_from_main(metrics.get("mAP", -1.0) if info.is_main else 0.0)
    if keep_best and best > state["best_map"]:
        # the reference reports the best evaluation of a run; its checkpoint is kept as "best"
        state["best_map"] = best
        if info.is_main:
            state["best"] = {"epoch": state["step"] // steps_per_epoch,
                             **{k: metrics[k] for k in ("mAP", "R1", "R5", "R10") if k in metrics}}
        tag = _save(engine, ckpt_dir, state, info)
        ckpt.mark_best(ckpt_dir, tag, info.rank)
    if keep_best and info.is_main and state["best"]:
        best_metrics = {f"best_{k}": v for k, v in state["best"].items()}
        tracker.log_metrics(best_metrics, state["step"])
        metrics.update(best_metrics)
        log.info("best so far: epoch %d, mAP %.2f", state["best"]["epoch"], state["best"].get("mAP", -1.0))
    return metrics


def _save(engine, ckpt_dir, state, info) -> str:
    tag = f"step{state['step']:08d}"
    if ckpt.read_pointer(ckpt_dir, "latest") != tag:
        try:
            ckpt.save(engine, ckpt_dir, tag, state, info.rank, state["config"]["train"]["keep_last"])
        except ckpt.CheckpointError:
            # every rank at once; rank 0 logged the one-line reason (a full disk: where, how much, --resume)
            raise SystemExit(1) from None
    return tag


def _log_start(config, info, plan, manifest, model):
    n_params = sum(p.numel() for p in model.parameters())
    log.info("world %d | %s: %d train samples, %d ids, %d cameras | global batch %d = micro %d x accum %d x world %d"
             " | %d steps/epoch x %d epochs | %.2fM params on rank 0",
             info.world_size, manifest["dataset"], manifest["splits"]["train"]["num_samples"],
             manifest["num_classes"], manifest["num_cameras"], config.train.global_batch, plan.micro, plan.accum,
             info.world_size, plan.steps_per_epoch, config.train.epochs, n_params / 1e6)
