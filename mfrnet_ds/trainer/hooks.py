"""The trainer's periodic work as (every, fn) hooks: a log line every train.log_every steps, a checkpoint every
train.ckpt_every steps (or at every epoch's end when 0), an evaluation every train.eval_every epochs and after
the last. Each hook takes the Trainer; every rank runs every hook (they hold collectives)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.eval.embed import evaluate_settings, format_table
from mfrnet_ds.eval.health import collapse_warning
from mfrnet_ds.eval.pixel import pixel_baseline
from mfrnet_ds.model import MISSING_SETTINGS
from mfrnet_ds.shards import manifest_protocol
from mfrnet_ds.trainer.finish import finish_run
from mfrnet_ds.trainer.state import Trainer

log = logging.getLogger("mfrnet_ds.train")


def _never(t: Trainer) -> bool:
    return False


@dataclass
class Hook:
    """`fn(trainer)` every `every` steps or epochs (0: never by count), and whenever `also(trainer)`."""
    every: int
    fn: Callable[[Trainer], object]
    also: Callable[[Trainer], bool] = _never

    def due(self, t: Trainer, count: int) -> bool:
        return bool(self.every and count % self.every == 0) or self.also(t)


def step_hooks(t: Trainer) -> list[Hook]:
    """Run after a step (count: the step), in this order. The log line also marks the last step and a stop."""
    train = t.config.train
    return [Hook(train.log_every, log_step, also=lambda t: t.step == t.end or bool(t.stopping)),
            Hook(train.ckpt_every, save)]


def epoch_hooks(t: Trainer) -> list[Hook]:
    """Run after a whole epoch (count: the epochs done), the evaluation before the checkpoint; both also run
    after the last epoch. With train.ckpt_every=0 every epoch ends with a checkpoint."""
    train = t.config.train
    return [Hook(train.eval_every, _evaluate_epoch, also=_last_epoch),
            Hook(0 if train.ckpt_every else 1, save, also=_last_epoch)]


def end_hooks(t: Trainer) -> list[Hook]:
    """Run once on rank 0 after a finished run; a stopped run has none (the resumed run finalises)."""
    return [Hook(1, finish_run)]


def _last_epoch(t: Trainer) -> bool:
    return t.step // t.plan.steps_per_epoch == t.config.train.epochs


def _evaluate_epoch(t: Trainer) -> None:
    evaluate(t, missing_too=_last_epoch(t) and t.config.train.eval_missing)
    t.evaluated = t.step


def save(t: Trainer) -> str:
    """Collective: checkpoint this step (once: a step saved already is not saved again)."""
    tag = f"step{t.step:08d}"
    if ckpt.read_pointer(t.ckpt_dir, "latest") != tag:
        try:
            ckpt.save(t.engine, t.ckpt_dir, tag, t.client_state(), t.info.rank, t.config.train.keep_last)
        except ckpt.CheckpointError:
            # every rank at once; rank 0 logged the one-line reason (a full disk: where, how much, --resume)
            raise SystemExit(1) from None
    return tag


def _step_metrics(t: Trainer) -> tuple[dict, list[str]] | None:
    """Collective: the step's metrics averaged over the ranks (rank 0; None elsewhere) and the MoE summary.

    One vector, summed over the ranks in one all-reduce and read back in one transfer: the loss parts and, per
    layer, the dropped fraction and the balance loss (DeepSpeed's, from this rank's tokens), all averaged over
    the ranks, then every layer's expert counts, summed (each rank routes its own tokens)."""
    moe = t.engine.module.moe_stats()
    averaged = [v.detach().float() for v in t.parts.values()]
    for s in moe.values():
        averaged += [s["dropped"].float(), s["balance"].float()]
    flat = D.reduce_sum_(torch.cat([torch.stack(averaged), *[s["counts"].float() for s in moe.values()]]))
    if not t.info.is_main:
        return None
    values = flat.tolist()
    means = [v / t.info.world_size for v in values[:len(averaged)]]
    counts = values[len(averaged):]
    metrics = dict(zip(t.parts, means))
    metrics["lr"] = t.engine.get_lr()[0]
    grad_norm = t.engine.get_global_grad_norm()   # DeepSpeed computes it where it clips (train.grad_clip > 0)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["samples_per_s"] = t.window["samples"] / max(time.perf_counter() - t.window["t0"], 1e-9)
    loads = []
    per_layer = means[len(t.parts):]
    for i, (name, s) in enumerate(moe.items()):
        c = counts[:len(s["counts"])]
        counts = counts[len(s["counts"]):]
        share = [x / max(sum(c), 1) for x in c]
        d, balance = per_layer[2 * i], per_layer[2 * i + 1]
        metrics.update({f"expert_load/{name}/{e}": x for e, x in enumerate(share)})
        metrics[f"dropped/{name}"] = d
        metrics[f"balance/{name}"] = balance
        loads.append(f"{name}[{' '.join(f'{x:.2f}' for x in share)}] drop {d:.2f}")
    return metrics, loads


def log_step(t: Trainer) -> None:
    """Collective: the step's metrics to the tracker, train_log.jsonl and the progress bar (rank 0)."""
    found = _step_metrics(t)
    if found is not None:
        metrics, loads = found
        t.tracker.log_metrics(metrics, t.step)
        # a run that started offline gets its id when the store comes back: checkpoints then resume that run
        t.run_id = t.tracker.run_id or t.run_id
        with open(t.out_dir / "train_log.jsonl", "a") as f:   # plain-text record next to the tracker's
            f.write(json.dumps({"step": t.step, "time": time.time(), **metrics}) + "\n")
        t.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
        t.bar.write(f"step {t.step:>6} loss {metrics['loss']:.4f} (id {metrics['loss_id']:.4f} "
                    f"tri {metrics['loss_tri']:.4f} aux {metrics['loss_aux']:.4f}) lr {metrics['lr']:.2e} "
                    f"{metrics['samples_per_s']:.1f} samples/s | " + " | ".join(loads))
    t.window.update(t0=time.perf_counter(), samples=0)


def evaluate(t: Trainer, missing_too: bool = False, keep_best: bool = True) -> dict:
    """Collective: evaluate, log (rank 0) and, with keep_best, checkpoint a new best as "best". Sets
    t.metrics; returns the metrics (rank 0; {} elsewhere)."""
    settings = [""] + (list(MISSING_SETTINGS) if missing_too and manifest_protocol(t.manifest).evaluates_missing
                           else [])
    # A split damaged beyond data.max_damaged_share raises DamagedSplitError on every rank: the run stops.
    results = evaluate_settings(t.engine, t.config.data.shards, t.manifest, settings, **t.eval_kwargs())
    metrics = _record_evaluation(t, results) if t.info.is_main else {}
    best = D.broadcast_from_main(metrics.get("mAP", -1.0) if t.info.is_main else 0.0)
    if keep_best and best > t.best_map:
        # the reference reports the best evaluation of a run; its checkpoint is kept as "best"
        t.best_map = best
        if t.info.is_main:
            t.best = {"epoch": t.step // t.plan.steps_per_epoch,
                      **{k: metrics[k] for k in ("mAP", "R1", "R5", "R10") if k in metrics}}
        ckpt.mark_best(t.ckpt_dir, save(t), t.info.rank)
    if keep_best and t.info.is_main and t.best:
        best_metrics = {f"best_{k}": v for k, v in t.best.items()}
        t.tracker.log_metrics(best_metrics, t.step)
        metrics.update(best_metrics)
        log.info("best so far: epoch %d, mAP %.2f", t.best["epoch"], t.best.get("mAP", -1.0))
    t.metrics = metrics
    return metrics


def _record_evaluation(t: Trainer, results: dict) -> dict:
    """Rank 0: the evaluation's metrics (with the pixel baseline's) to the tracker, eval_log.jsonl and the log."""
    metrics = {}
    for missing, r in results.items():
        suffix = f"_missing_{missing}" if missing else ""
        # the damaged counts belong to the data, not the setting: logged once, also when 0
        metrics.update({f"{k}{suffix}" if not k.startswith("damaged_") else k: v for k, v in r.items()})
    if metrics.get("damaged_query") or metrics.get("damaged_gallery"):
        log.warning("evaluation at step %d left out damaged samples: %d of the query, %d of the gallery "
                    "(the reader's warnings name their shards)", t.step, metrics["damaged_query"],
                    metrics["damaged_gallery"])
    # the trivial baseline beside every evaluation (cached per shard set: computed once)
    c = t.config
    pixel = pixel_baseline(c.data.shards, t.manifest, c.model.img_size, batch_size=c.data.eval_batch,
                           num_workers=c.data.num_workers)
    metrics.update({f"pixel_{k}": v for k, v in pixel.items()})
    t.tracker.log_metrics(metrics, t.step)
    with open(t.out_dir / "eval_log.jsonl", "a") as f:
        f.write(json.dumps({"step": t.step, "time": time.time(), **metrics}) + "\n")
    log.info("evaluation at step %d:\n%s", t.step, format_table(results, pixel))
    warning = collapse_warning(results[""])
    if warning and t.step > 0:
        log.warning("step %d: %s", t.step, warning)
    return metrics
