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

import errno
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mfrnet_ds.config import MissingFileError
from mfrnet_ds.engine import dist as D

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved. Raised on every rank together, after rank 0 logged why in one line."""


def save(engine, ckpt_dir: Path, tag: str, state: dict, rank: int, keep_last: int) -> None:
    """Collective: every rank must call it. `state` is the loop's client state (step, epoch, best mAP...).
    Once saved, step tags older than the newest `keep_last` (train.keep_last) go, except `best`.
    Raises CheckpointError on every rank when any rank could not write its part (see the module docstring)."""
    ckpt_dir, t0, sync = Path(ckpt_dir), time.perf_counter(), _Syncs()
    tag_dir = ckpt_dir / tag
    failure = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():    # this step's save was cut short before (a crash, a full disk): start afresh
                shutil.rmtree(tag_dir)
            tag_dir.mkdir()
        except Exception as e:
            failure = _failure(e, tag_dir, rank)
    _agree(ckpt_dir, tag, failure, rank)     # and no rank writes into the folder before it is fresh

    writes = _GuardedWrites(engine, rank)
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
            failure = _failure(e, path, rank)
    _agree(ckpt_dir, tag, failure, rank)     # every rank's files are on disk

    if rank == 0:
        path = ckpt_dir
        try:
            sync.path(ckpt_dir)              # the tag folder's own entry
            path = tag_dir / "COMPLETE"
            _write_durable(path, "ok\n", sync)
            sync.path(tag_dir)
            path = ckpt_dir / "latest"
            _write_atomic(path, tag, sync)
        except Exception as e:
            failure = _failure(e, path, rank)
        else:
            _rotate(ckpt_dir, keep_last, protect={tag, read_pointer(ckpt_dir, "best") or ""})
            log.info("checkpoint %s saved: %s in %.2f s (rank 0's fsyncs %.2f s)", tag, _human(_du(tag_dir)),
                     time.perf_counter() - t0, sync.seconds)
    _agree(ckpt_dir, tag, failure, rank)


def mark_best(ckpt_dir: Path, tag: str, rank: int) -> None:
    if rank == 0:
        old = read_pointer(ckpt_dir, "best")
        try:
            _write_atomic(ckpt_dir / "best", tag)
        except OSError as e:    # the checkpoint itself is saved; a full disk stops the run at the next save
            log.warning("could not point %s at %s (%s); it still names %s", ckpt_dir / "best", tag, e, old)
        else:
            latest = read_pointer(ckpt_dir, "latest")
            if old and old not in (tag, latest):
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


# ---- durable writes ------------------------------------------------------------------------------------

class _Syncs:
    """fsync, adding up the time it takes."""

    def __init__(self):
        self.seconds = 0.0

    def fd(self, fd: int) -> None:
        t0 = time.perf_counter()
        os.fsync(fd)
        self.seconds += time.perf_counter() - t0

    def file(self, f) -> None:
        f.flush()
        self.fd(f.fileno())

    def path(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)     # a folder too: fsync of its descriptor makes its entries durable
        try:
            self.fd(fd)
        finally:
            os.close(fd)


def _write_durable(path: Path, text: str, sync: _Syncs) -> None:
    with open(path, "w") as f:
        f.write(text)
        sync.file(f)


def _write_atomic(path: Path, text: str, sync: _Syncs | None = None) -> None:
    """Replace `path` with `text` so that after a crash it holds the old text or the new, and after return the
    new one is on disk."""
    sync = sync or _Syncs()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_durable(tmp, text, sync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    sync.path(path.parent)


class _GuardedWrites:
    """Around one engine.save_checkpoint call: DeepSpeed's writes (its checkpoint engine's save and makedirs, and
    the ZeRO recovery-script copy) record the first failure instead of raising it, and are skipped after one.
    A rank whose write raised would leave save_checkpoint before its closing barrier with the other ranks
    waiting in it; guarded, every rank runs DeepSpeed's collectives to the end and the ranks then agree.
    (Any other exception inside save_checkpoint still propagates: train.collective_timeout_s bounds the wait.)
    Also collects the files this rank wrote, to fsync them."""

    def __init__(self, engine, rank: int):
        self.engine, self.rank = engine, rank
        self.files: list[Path] = []
        self.failure: dict | None = None
        self._patched: list[tuple[object, str, bool, object]] = []

    def __enter__(self):
        ce = self.engine.checkpoint_engine
        for owner, name, path_at in ((ce, "save", 1), (ce, "makedirs", 0), (self.engine, "_copy_recovery_script", 0)):
            if hasattr(owner, name):
                self._guard(owner, name, path_at, keep=name == "save")
        return self

    def __exit__(self, *exc):
        for owner, name, had, before in reversed(self._patched):
            if had:
                setattr(owner, name, before)
            else:
                delattr(owner, name)
        return False

    def _guard(self, owner, name: str, path_at: int, keep: bool = False) -> None:
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            if self.failure is not None:
                return None
            path = args[path_at] if len(args) > path_at else next(iter(kwargs.values()), "?")
            try:
                result = original(*args, **kwargs)
            except Exception as e:
                self.failure = _failure(e, path, self.rank)
                return None
            if keep:
                self.files.append(Path(path))
            return result

        self._patched.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, guarded)


# ---- a save that failed ----------------------------------------------------------------------------------

SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


def _failure(exc: BaseException, path, rank: int) -> dict:
    """What a rank reports about its failed write (picklable, for the exchange)."""
    code = _errno(exc)
    if code is None:
        # torch's zip writer reports a short write without the errno ("unexpected pos 576 vs 534")
        try:
            if shutil.disk_usage(_existing(Path(path))).free < 1 << 20:
                code = errno.ENOSPC
        except OSError:
            pass
    text = (str(exc).strip().splitlines() or [""])[0]
    return {"rank": rank, "path": str(path), "errno": code, "error": f"{type(exc).__name__}: {text}"[:300]}


def _errno(exc: BaseException) -> int | None:
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    # torch.save reports a failed write as RuntimeError("write(): fd 3 failed with No space left on device")
    return next((c for c in (*SPACE_ERRORS, errno.EIO, errno.EROFS, errno.EACCES) if os.strerror(c) in str(exc)),
                None)


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
    first = min(failures, key=lambda f: (f["errno"] not in SPACE_ERRORS, f["rank"]))  # a full disk explains all
    tag_dir = ckpt_dir / tag
    latest = read_pointer(ckpt_dir, "latest")
    written = _du(tag_dir)
    if latest != tag:
        shutil.rmtree(tag_dir, ignore_errors=True)
    if latest and latest != tag:
        step = re.fullmatch(r"step0*(\d+)", latest)
        then = (f"`latest` still names {latest}: free space there and rerun with --resume to continue from "
                f"{'step ' + step.group(1) if step else latest}")
        need = f"about {_human(_du(ckpt_dir / latest))} (the size of {latest})"
    elif latest == tag:
        then = f"`latest` names {tag}, written before the error"
        need = f"about {_human(written)}"
    else:
        then = "there is no complete checkpoint yet: free space there and rerun, which starts from the beginning"
        need = f"more than the {_human(written)} written before it failed"
    if first["errno"] in SPACE_ERRORS:
        try:
            usage = shutil.disk_usage(_existing(ckpt_dir))
            room = f" ({_human(usage.free)} free of {_human(usage.total)})"
        except OSError:
            room = ""
        return (f"checkpoint {tag} was not saved: {os.strerror(first['errno']).lower()} on the "
                f"{_file_system(ckpt_dir)}{room} when rank {first['rank']} wrote {first['path']}; a checkpoint "
                f"needs {need}; {then}")
    return (f"checkpoint {tag} was not saved: rank {first['rank']} could not write {first['path']} "
            f"({first['error']}) on the {_file_system(ckpt_dir)}; {then.replace('free space there', 'fix that')}")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _du(path: Path) -> int:
    """Bytes the files under `path` take on disk (what `du` says), 0 if there is no such folder."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_blocks * 512 or st.st_size
    return total


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _file_system(path: Path) -> str:
    """'tmpfs file system mounted at /x' or 'ext4 file system /dev/sda1 mounted at /': the one holding `path`."""
    real = os.path.realpath(_existing(path))
    best = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount, (fstype, source) = _unescape(left.split()[4]), right.split()[:2]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[0])):   # the last of equals is on top
                    best = (mount, fstype, _unescape(source))
    except (OSError, ValueError, IndexError):
        pass
    if best is None:
        return f"file system holding {real}"
    mount, fstype, source = best
    return f"{fstype if source in (fstype, 'none') else f'{fstype} {source}'} file system mounted at {mount}"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


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
