"""Checkpoints: DeepSpeed's files (model, expert shards, optimiser, scheduler) plus our training state.

Layout of `out_dir/checkpoints/`:
    step000120/            one DeepSpeed tag: mp_rank_00_model_states.pt, one file per expert
                           (layer_L_expert_E_...), optimiser shards, and ours: rng_rank<R>.pt, COMPLETE
    latest                 the tag to resume from; replaced atomically only after every rank finished
    best                   the tag with the best mAP so far (kept out of the rotation)

A crash while writing leaves the new tag without COMPLETE and `latest` still naming the previous one.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

KEEP_LAST = 2
log = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, tag: str, state: dict, rank: int, keep: set[str] = frozenset()) -> None:
    """Collective: every rank must call it. `state` is the loop's client state (step, epoch, best mAP...)."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (ckpt_dir / tag / "COMPLETE").write_text("ok\n")
        _write_atomic(ckpt_dir / "latest", tag)
        _rotate(ckpt_dir, protect={tag, *keep, read_pointer(ckpt_dir, "best") or ""})
    dist.barrier()


def mark_best(ckpt_dir: Path, tag: str, rank: int) -> None:
    if rank == 0:
        old = read_pointer(ckpt_dir, "best")
        _write_atomic(ckpt_dir / "best", tag)
        latest = read_pointer(ckpt_dir, "latest")
        if old and old not in (tag, latest):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


def read_pointer(ckpt_dir: Path, name: str) -> str | None:
    p = Path(ckpt_dir) / name
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_dir) / tag / "COMPLETE").is_file() else None


def resolve(path: str | Path, best: bool = False) -> tuple[Path, str]:
    """A checkpoint folder (its `latest`, or with `best` its best-mAP tag where there is one) or one tag
    folder -> (checkpoints dir, tag)."""
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path.parent, path.name
    for candidate in (path, path / "checkpoints"):
        tag = read_pointer(candidate, "latest")
        if tag:
            return candidate, (best and read_pointer(candidate, "best")) or tag
    raise FileNotFoundError(f"{path}: no complete checkpoint (expected a 'latest' file naming a tag folder "
                            f"with COMPLETE, or a tag folder itself)")


def layout(engine, world_size: int) -> dict:
    """What the optimiser state's sharding depends on; saved with every checkpoint."""
    return {"world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
            "ep_sizes": sorted({m.ep_size for m in engine.module.moe_layers})}


def load(engine, ckpt_dir: Path, tag: str, rank: int, current_layout: dict) -> dict:
    """Restore engine + RNG state; returns the loop's client state.

    Same layout (world size, ZeRO stage, expert-parallel sizes): everything is restored. Another layout:
    the weights, experts included, are restored (expert files are keyed by global expert index, so any
    ep_size re-shards them) but the optimiser moments start afresh, because DeepSpeed shards them by
    rank; the step, the lr schedule and the best mAP carry over. A warning says so.
    """
    states = read_model_states(ckpt_dir / tag)
    saved = states.get("layout")
    same = saved == current_layout
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=not same,
                                               load_optimizer_states=same, load_lr_scheduler_states=same)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if not same:
        if rank == 0:
            log.warning("checkpoint %s was written with %s, this run has %s: weights and experts restored, "
                        "optimizer state (Adam moments) reset; step, lr schedule and best mAP continue",
                        ckpt_dir / tag, saved, current_layout)
        client = states   # DeepSpeed returns no client state when it loads the module only
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.last_epoch = client.get("step", 0) - 1
            engine.lr_scheduler.step()
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if same and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return client


def read_model_states(tag_dir: Path) -> dict:
    """DeepSpeed's non-expert file of a tag: `module` weights plus our client state (step, config, layout)."""
    # our own file, written by save(); it holds DeepSpeed objects, hence weights_only=False
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def _rotate(ckpt_dir: Path, protect: set[str]) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-KEEP_LAST]:
        if old not in protect:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain tuples only, so the file loads with weights_only=True
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
