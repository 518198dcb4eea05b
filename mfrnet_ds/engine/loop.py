"""The training loop: P x K batches -> forward -> losses -> backward -> step, with logging, evaluation
and checkpoints around it. One obvious path from batch to step; periodic work in small functions."""
from __future__ import annotations

import json
import logging
import random
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mfrnet_ds.config import Config, ConfigError, derive_batch
from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.loss import compute_losses
from mfrnet_ds.engine.optim import build_optimizer, build_scheduler, param_groups
from mfrnet_ds.eval.embed import evaluate_settings, format_table
from mfrnet_ds.eval.health import collapse_warning
from mfrnet_ds.eval.pixel import pixel_baseline
from mfrnet_ds.model import MISSING_SETTINGS, build_model
from mfrnet_ds.stream.pipeline import read_manifest, train_loader
from mfrnet_ds.tracking import NullTracker, tracker_for_rank
from mfrnet_ds.tracking.finish import finalize_run

log = logging.getLogger("mfrnet_ds.train")


# How batches are drawn; saved in checkpoints so a resume can tell a run that drew them another way.
SAMPLER = "global-pk-v1"


class NonFiniteLoss(RuntimeError):
    pass


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
    manifest = read_manifest(config.data.shards)
    config = with_dataset(config, manifest)
    ds_config = D.deepspeed_config(config, info.world_size, ds_config_path)
    plan = make_plan(config, manifest, info.world_size)

    model = build_model(config, rank=info.rank)
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
        found = ckpt.read_pointer(ckpt_dir, "latest")
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_dir}")
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

    tracker = _start_tracking(config, info, manifest, ds_config, state.get("run_id"))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (out_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        state["run_id"] = tracker.run_id
        _log_start(config, info, plan, manifest, model)

    eval_kw = dict(img_size=config.model.img_size, batch_size=config.data.eval_batch, rank=info.rank,
                   world_size=info.world_size, device=info.device, num_workers=config.data.num_workers,
                   progress=info.is_main, dtype=dtype, re_ranking=config.data.re_ranking)
    metrics = {}
    try:
        if config.train.eval_first and state["step"] == 0:
            metrics = _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir, missing_too=False,
                                keep_best=False)
            if info.is_main:
                (out_dir / "metrics_untrained.json").write_text(json.dumps(metrics, indent=2))
        end = min(plan.total_steps, config.train.max_steps or plan.total_steps)
        while state["step"] < end:
            epoch, in_epoch = divmod(state["step"], plan.steps_per_epoch)
            _train_epoch(engine, config, info, plan, state, epoch, in_epoch, end, dtype, tracker, ckpt_dir)
            if state["step"] % plan.steps_per_epoch:      # stopped inside an epoch by train.max_steps
                _save(engine, ckpt_dir, state, info)
                break
            last = epoch + 1 == config.train.epochs
            if last or (epoch + 1) % config.train.eval_every == 0:
                metrics = _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir,
                                    missing_too=last and config.train.eval_missing,
                                    steps_per_epoch=plan.steps_per_epoch)
            if config.train.ckpt_every == 0 or last:
                _save(engine, ckpt_dir, state, info)
    except BaseException:
        tracker.close("FAILED")
        raise
    if info.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        finalize_run(tracker, out_dir=out_dir, ckpt_dir=ckpt_dir, shards=config.data.shards, manifest=manifest,
                     config=config)
    tracker.close("FINISHED")
    return metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train_epoch(engine, config, info, plan, state, epoch, in_epoch, end, dtype, tracker, ckpt_dir):
    # Each item is this rank's share of one global P x K batch: its slice of every micro step (see stream/).
    loader = train_loader(config.data.shards, global_batch=config.train.global_batch,
                          num_instances=config.data.num_instances, img_size=config.model.img_size,
                          batches_per_epoch=plan.steps_per_epoch, num_workers=config.data.num_workers,
                          seed=config.train.seed, epoch=epoch, rank=info.rank, world_size=info.world_size,
                          accum=plan.accum, start_batch=in_epoch, aligned=config.data.aligned_augment)
    with torch.random.fork_rng(devices=[]):   # starting the loader must not move the training RNG (resume)
        batches = iter(loader)
    bar = tqdm(total=plan.steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{config.train.epochs}",
               disable=not info.is_main, dynamic_ncols=True)
    engine.train()
    window = {"t0": time.perf_counter(), "samples": 0}
    for batch in batches:
        skip_update = False
        for micro in range(plan.accum):
            rows = slice(micro * plan.micro, (micro + 1) * plan.micro)
            images = batch["images"][rows].to(info.device, dtype=dtype, non_blocking=True)
            parts = step_losses(engine, images, batch["camids"][rows].to(info.device),
                                batch["labels"][rows].to(info.device), config.loss)
            loss = parts["loss"]
            if not _all_finite(loss, info):
                msg = f"non-finite loss at step {state['step'] + 1} (epoch {epoch + 1}): " + \
                      ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                if config.train.on_nan == "stop":
                    raise NonFiniteLoss(msg + "; set train.on_nan=skip to skip such batches")
                if info.is_main:
                    log.warning("%s; this step's update is skipped", msg)
                # Backward and step still run on every rank, so DeepSpeed's accumulation and gradient reduction
                # stay in step: a zero loss over every parameter now, and a zero learning rate at the boundary.
                loss = sum(p.view(-1)[0] * 0 for p in engine.module.parameters() if p.requires_grad)
                skip_update = True
            engine.backward(loss)
            if skip_update and micro == plan.accum - 1:
                _zero_lr(engine)   # the scheduler sets the next step's lrs again inside engine.step()
            engine.step()
            window["samples"] += images.shape[0] * info.world_size
        state["step"] += 1
        bar.update(1)
        if state["step"] % config.train.log_every == 0 or state["step"] == end:
            _log_step(engine, parts, state, window, info, tracker, bar, Path(config.train.out_dir))
        if config.train.ckpt_every and state["step"] % config.train.ckpt_every == 0:
            _save(engine, ckpt_dir, state, info)
        if state["step"] % plan.steps_per_epoch == 0 or state["step"] == end:
            break
    bar.close()


def step_losses(model, images: torch.Tensor, camids: torch.Tensor, labels: torch.Tensor, cfg) -> dict:
    """Forward this rank's slice of a global micro batch -> the loss parts of the WHOLE global micro batch.

    Mining and BNNeck see every rank's features (gathered; gradients flow back to the rank that made them),
    so the losses, and with DeepSpeed's gradient averaging the update, do not depend on the number of
    ranks. `model` is a DeepSpeed engine or a plain MFRNet."""
    out = model(images, camids)
    features = [D.gather_batch(f) for f in out.features]
    logits = getattr(model, "module", model).classify(features)
    return compute_losses(logits, features, D.gather_batch(labels), out.aux_loss, cfg)


def _zero_lr(engine) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0


def _all_finite(loss: torch.Tensor, info) -> bool:
    # Every rank must agree to skip: the MoE all-to-all in backward needs all ranks.
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    if info.world_size > 1:
        dist.all_reduce(flag)
    return flag.item() == 0


def _log_step(engine, parts, state, window, info, tracker, bar, out_dir: Path):
    elapsed = time.perf_counter() - window["t0"]
    values = {k: v.detach().float() for k, v in parts.items()}
    stacked = torch.stack(list(values.values()))
    moe = engine.module.moe_stats()
    counts = [s["counts"].float() for s in moe.values()]
    # per layer: dropped fraction and balance loss (DeepSpeed's, from this rank's tokens), averaged over ranks
    per_layer = torch.stack([torch.stack([s["dropped"].float(), s["balance"]]) for s in moe.values()]) \
        if moe else torch.zeros(0, 2)
    if info.world_size > 1:   # average over ranks; expert counts summed (each rank routes its own tokens)
        dist.all_reduce(stacked)
        stacked /= info.world_size
        for c in counts:
            dist.all_reduce(c)
        dist.all_reduce(per_layer)
        per_layer /= info.world_size
    if not info.is_main:
        window.update(t0=time.perf_counter(), samples=0)
        return
    metrics = dict(zip(values, stacked.tolist()))
    metrics["lr"] = engine.get_lr()[0]
    grad_norm = engine.get_global_grad_norm()   # DeepSpeed computes it where it clips (train.grad_clip > 0)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["samples_per_s"] = window["samples"] / max(elapsed, 1e-9)
    loads = []
    for (name, _), c, (d, balance) in zip(moe.items(), counts, per_layer.tolist()):
        share = (c / c.sum().clamp_min(1)).tolist()
        metrics.update({f"expert_load/{name}/{e}": s for e, s in enumerate(share)})
        metrics[f"dropped/{name}"] = d
        metrics[f"balance/{name}"] = balance
        loads.append(f"{name}[{' '.join(f'{s:.2f}' for s in share)}] drop {d:.2f}")
    tracker.log_metrics(metrics, state["step"])
    with open(out_dir / "train_log.jsonl", "a") as f:   # plain-text record next to the tracker's
        f.write(json.dumps({"step": state["step"], "time": time.time(), **metrics}) + "\n")
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
    bar.write(f"step {state['step']:>6} loss {metrics['loss']:.4f} (id {metrics['loss_id']:.4f} "
              f"tri {metrics['loss_tri']:.4f} aux {metrics['loss_aux']:.4f}) lr {metrics['lr']:.2e} "
              f"{metrics['samples_per_s']:.1f} samples/s | " + " | ".join(loads))
    window.update(t0=time.perf_counter(), samples=0)


def _evaluate(engine, config, manifest, eval_kw, state, tracker, info, ckpt_dir, missing_too, keep_best=True,
              steps_per_epoch=1):
    settings = [""] + (list(MISSING_SETTINGS) if missing_too and manifest["dataset"] == "rgbnt201" else [])
    results = evaluate_settings(engine, config.data.shards, manifest, settings, **eval_kw)
    metrics = {}
    if info.is_main:
        for missing, r in results.items():
            suffix = f"_missing_{missing}" if missing else ""
            metrics.update({f"{k}{suffix}": v for k, v in r.items()})
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
    best = torch.tensor([metrics.get("mAP", -1.0) if info.is_main else 0.0], device=info.device)  # NCCL: on device
    if info.world_size > 1:
        dist.broadcast(best, src=0)
    if keep_best and best.item() > state["best_map"]:
        # the reference reports the best evaluation of a run; its checkpoint is kept as "best"
        state["best_map"] = best.item()
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
        ckpt.save(engine, ckpt_dir, tag, state, info.rank)
    return tag


def _start_tracking(config, info, manifest, ds_config, run_id):
    """Rank 0 opens (or, on resume, reopens) the MLflow run; other ranks get a tracker that does nothing."""
    if not config.tracking.enabled:
        return NullTracker()
    tracker = tracker_for_rank(info.rank, config.train.out_dir, tracking_uri=config.tracking.uri or None)
    m = config.model
    params = {"config": config.to_dict(), "deepspeed": ds_config, "world_size": info.world_size,
              "git_commit": _git_commit(),
              "data": {"dataset": manifest["dataset"], "num_classes": manifest["num_classes"],
                       "num_cameras": manifest["num_cameras"],
                       **{f"{k}_samples": v["num_samples"] for k, v in manifest["splits"].items()}}}
    name = config.tracking.run_name or (f"{config.name}-{m.preset}-frm{m.frm.num_experts}x{m.frm.router}"
                                        f"-top{m.frm.top_k}-ep{m.frm.ep_size}-w{info.world_size}-"
                                        f"{time.strftime('%m%d-%H%M%S')}")
    tracker.start(config.tracking.experiment or manifest["dataset"], name, params,
                  tags={"preset": m.preset, "dataset": manifest["dataset"]}, resume_run_id=run_id)
    return tracker


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _log_start(config, info, plan, manifest, model):
    n_params = sum(p.numel() for p in model.parameters())
    log.info("world %d | %s: %d train samples, %d ids, %d cameras | global batch %d = micro %d x accum %d x world %d"
             " | %d steps/epoch x %d epochs | %.2fM params on rank 0",
             info.world_size, manifest["dataset"], manifest["splits"]["train"]["num_samples"],
             manifest["num_classes"], manifest["num_cameras"], config.train.global_batch, plan.micro, plan.accum,
             info.world_size, plan.steps_per_epoch, config.train.epochs, n_params / 1e6)
