"""Checkpoints: DeepSpeed's files (model, expert shards, optimiser, scheduler) plus our training state.

Layout of `out_dir/checkpoints/`:
    step000120/            one DeepSpeed tag: mp_rank_00_model_states.pt, one file per expert
                           (layer_L_expert_E_...), optimiser shards, and ours: rng_rank<R>.pt, COMPLETE
    latest                 the tag to resume from; replaced atomically only after every rank finished
    best                   the tag with the best mAP so far (kept out of the rotation)

A save, all ranks together:
  1. rank 0 makes the tag folder afresh (a folder of this tag left by a save that never completed goes first);
  2. every rank writes its DeepSpeed files and rng_rank<R>.pt and fsyncs each file it wrote, then the tag folder;
  3. the ranks exchange "my part failed" (one all_gather);
  4. rank 0 fsyncs the checkpoints folder (the tag folder's entry), writes and fsyncs COMPLETE and fsyncs the tag
     folder, writes `latest` to a temp file, fsyncs it, renames it over `latest`, fsyncs the checkpoints folder,
     and rotates old tags; the ranks exchange the outcome once more.
So a crash at any point (node crash included: nothing `latest` names can be lost with the page cache) leaves
`latest` naming a complete checkpoint, the previous one until the rename.

A failed write (a full disk, above all) never leaves a rank waiting in a collective: DeepSpeed's writes are
guarded so every rank runs its collectives to the end, and the exchange tells every rank. Rank 0 then removes
the partial tag (`latest` keeps naming the previous one) and logs one line: the file system, the space free,
what a checkpoint needs (the size of the previous one), and that --resume continues from it once there is
room; every rank raises CheckpointError.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mfrnet_ds.config import MissingFileError, config_from_saved
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine import durable
from mfrnet_ds.model.moe import EXPERT_KEY

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved. Raised on every rank together, after rank 0 logged why in one line."""


def save(engine, ckpt_dir: Path, tag: str, state: dict, rank: int, keep_last: int) -> None:
    """Collective: every rank must call it. `state` is the loop's client state (step, epoch, best mAP...).
    Once saved, step tags older than the newest `keep_last` (train.keep_last) go, except `best`.
    Raises CheckpointError on every rank when any rank could not write its part (see the module docstring)."""
    ckpt_dir, t0, sync = Path(ckpt_dir), time.perf_counter(), durable.Syncs()
    tag_dir = ckpt_dir / tag
    failure = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():    # this step's save was cut short before (a crash, a full disk): start afresh
                shutil.rmtree(tag_dir)
            tag_dir.mkdir()
        except Exception as e:
            failure = durable.write_failure(e, tag_dir, rank)
    _agree(ckpt_dir, tag, failure, rank)     # and no rank writes into the folder before it is fresh

    writes = durable.GuardedWrites(engine, rank)
    with writes:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    failure = writes.failure
    if failure is None:
        path = tag_dir / f"rng_rank{rank}.pt"
        try:
            with open(path, "wb") as f:
                torch.save(_rng_state(), f)
                sync.file(f)
            for path in writes.files:
                sync.path(path)
            path = tag_dir
            sync.path(tag_dir)
        except Exception as e:
            failure = durable.write_failure(e, path, rank)
    _agree(ckpt_dir, tag, failure, rank)     # every rank's files are on disk

    if rank == 0:
        path = ckpt_dir
        try:
            sync.path(ckpt_dir)              # the tag folder's own entry
            path = tag_dir / "COMPLETE"
            durable.write_durable(path, "ok\n", sync)
            sync.path(tag_dir)
            path = ckpt_dir / "latest"
            durable.write_atomic(path, tag, sync)
        except Exception as e:
            failure = durable.write_failure(e, path, rank)
        else:
            _rotate(ckpt_dir, keep_last, protect={tag, read_pointer(ckpt_dir, "best") or ""})
            log.info("checkpoint %s saved: %s in %.2f s (rank 0's fsyncs %.2f s)", tag,
                     durable.human(durable.du(tag_dir)), time.perf_counter() - t0, sync.seconds)
    _agree(ckpt_dir, tag, failure, rank)


def mark_best(ckpt_dir: Path, tag: str, rank: int) -> None:
    if rank == 0:
        old = read_pointer(ckpt_dir, "best")
        try:
            durable.write_atomic(ckpt_dir / "best", tag)
        except OSError as e:    # the checkpoint itself is saved; a full disk stops the run at the next save
            log.warning("could not point %s at %s (%s); it still names %s", ckpt_dir / "best", tag, e, old)
        else:
            latest = read_pointer(ckpt_dir, "latest")
            if old and old not in (tag, latest):
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    D.barrier()


def _agree(ckpt_dir: Path, tag: str, failure: dict | None, rank: int) -> None:
    """Collective: raise CheckpointError on every rank if any rank reports a failure."""
    failures = [f for f in D.all_ranks(failure) if f]
    if not failures:
        return
    message = None
    if rank == 0:
        message = _give_up(ckpt_dir, tag, failures)
        log.error("%s", message)
    message = D.all_ranks(message)[0]     # also: rank 0's line is out before any rank exits
    raise CheckpointError(message)


def _give_up(ckpt_dir: Path, tag: str, failures: list[dict]) -> str:
    """Rank 0: remove the partial tag and say in one line what happened and what to do."""
    # a full disk explains every other failure
    first = min(failures, key=lambda f: (f["errno"] not in durable.SPACE_ERRORS, f["rank"]))
    tag_dir = ckpt_dir / tag
    latest = read_pointer(ckpt_dir, "latest")
    written = durable.du(tag_dir)
    if latest != tag:
        shutil.rmtree(tag_dir, ignore_errors=True)
    if latest and latest != tag:
        step = re.fullmatch(r"step0*(\d+)", latest)
        then = (f"`latest` still names {latest}: free space there and rerun with --resume to continue from "
                f"{'step ' + step.group(1) if step else latest}")
        need = f"about {durable.human(durable.du(ckpt_dir / latest))} (the size of {latest})"
    elif latest == tag:
        then = f"`latest` names {tag}, written before the error"
        need = f"about {durable.human(written)}"
    else:
        then = "there is no complete checkpoint yet: free space there and rerun, which starts from the beginning"
        need = f"more than the {durable.human(written)} written before it failed"
    if first["errno"] in durable.SPACE_ERRORS:
        try:
            usage = shutil.disk_usage(durable.existing(ckpt_dir))
            room = f" ({durable.human(usage.free)} free of {durable.human(usage.total)})"
        except OSError:
            room = ""
        return (f"checkpoint {tag} was not saved: {os.strerror(first['errno']).lower()} on the "
                f"{durable.file_system(ckpt_dir)}{room} when rank {first['rank']} wrote {first['path']}; a checkpoint "
                f"needs {need}; {then}")
    return (f"checkpoint {tag} was not saved: rank {first['rank']} could not write {first['path']} "
            f"({first['error']}) on the {durable.file_system(ckpt_dir)}; {then.replace('free space there', 'fix that')}")


def read_pointer(ckpt_dir: Path, name: str) -> str | None:
    p = Path(ckpt_dir) / name
    if not p.is_file():
        return None
    tag = p.read_text(errors="replace").strip()   # a garbled pointer names no folder: as if absent
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
    raise MissingFileError(f"{path}: no complete checkpoint (expected a 'latest' file naming a tag folder "
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


def _rotate(ckpt_dir: Path, keep_last: int, protect: set[str]) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep_last]:
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


# ---- expert keys: local (one rank's slice) <-> global (ep_size 1 numbering) ----------------------------------

# DeepSpeed names a local expert `...deepspeed_experts.<local index>...` (EXPERT_KEY) and saves each in its own file
# under its global index; resume, export and evaluation on another number of processes map between the two.
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def expert_key_to_global(key: str, ep_rank: int, num_local: int) -> str:
    head, _, tail = key.partition(EXPERT_KEY)
    local, _, rest = tail.partition(".")
    return f"{head}{EXPERT_KEY}{ep_rank * num_local + int(local)}.{rest}"


def layer_of_key(model, key: str):
    """The MoE layer a state-dict key of one of its experts belongs to."""
    layer = model.get_submodule(key.partition(".moe.deepspeed_moe")[0])
    assert hasattr(layer, "local_experts"), key
    return layer


def shard_state_dict(full: dict[str, torch.Tensor], model, rank: int) -> dict[str, torch.Tensor]:
    """Select from a full (all experts, ep_size=1 numbering) state dict what `model` holds on `rank`."""
    out = {}
    for key in model.state_dict():
        if EXPERT_KEY in key:
            layer = layer_of_key(model, key)
            ep_rank = D.expert_parallel_rank(rank, layer.ep_size)
            out[key] = full[expert_key_to_global(key, ep_rank, len(layer.local_experts))]
        else:
            out[key] = full[key]
    return out


def merged_state_dict(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 state dict with global expert indices, the client state saved with it) of one tag."""
    main = read_model_states(tag_dir)
    state = {k: v.float() if v.is_floating_point() else v for k, v in main["module"].items()}
    for f in sorted(tag_dir.iterdir()):
        if EXPERT_FILE.search(f.name):
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                state[k] = v.float() if v.is_floating_point() else v
    return state, main


# ---- one file for inference -----------------------------------------------------------------------------

def export(ckpt: str | Path, out: str | Path, use_best: bool = False) -> Path:
    """One fp32 file {config (ep_size 1), state_dict (every expert), source} for inference in a plain process
    (`python -m mfrnet_ds.export`)."""
    ckpt_dir, tag = resolve(ckpt, best=use_best)
    state, main = merged_state_dict(ckpt_dir / tag)
    if "config" not in main:
        raise ValueError(f"{ckpt_dir / tag}: no experiment config in the checkpoint (not written by mfrnet_ds?)")
    config = main["config"]
    for kind in ("ffm", "frm"):
        config["model"][kind]["ep_size"] = 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"config": config, "state_dict": state, "source": str(ckpt_dir / tag)}, tmp)
    tmp.replace(out)
    return out


def load_exported(path: str | Path):
    """(Config, MFRNet in eval mode) from an exported file."""
    from mfrnet_ds.model import build_model

    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_saved(blob["config"])
    model = build_model(config)
    model.load_state_dict(blob["state_dict"])
    return config, model.eval()
