"""Files that survive a crash, and what to say when a write fails.

`write_atomic` replaces a small file so a crash leaves the old text or the new; `Syncs` fsyncs files and folders
and adds up the time; `GuardedWrites` turns the failures of DeepSpeed's checkpoint writes into a report instead
of an exception inside its collectives; `write_failure`, `du`, `human` and `file_system` describe a failed write
(a full disk above all) for the one-line message engine/ckpt.py gives.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path


class Syncs:
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


def write_durable(path: Path, text: str, sync: Syncs) -> None:
    with open(path, "w") as f:
        f.write(text)
        sync.file(f)


def write_atomic(path: Path, text: str, sync: Syncs | None = None) -> None:
    """Replace `path` with `text` so that after a crash it holds the old text or the new, and after return the
    new one is on disk."""
    sync = sync or Syncs()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_durable(tmp, text, sync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    sync.path(path.parent)


class GuardedWrites:
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
                self.failure = write_failure(e, path, self.rank)
                return None
            if keep:
                self.files.append(Path(path))
            return result

        self._patched.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, guarded)


# ---- what a failed write says ---------------------------------------------------------------------------

SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


def write_failure(exc: BaseException, path, rank: int) -> dict:
    """What a rank reports about its failed write (picklable, for the exchange)."""
    code = _errno(exc)
    if code is None:
        # torch's zip writer reports a short write without the errno ("unexpected pos 576 vs 534")
        try:
            if shutil.disk_usage(existing(Path(path))).free < 1 << 20:
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


def existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def du(path: Path) -> int:
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


def human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def file_system(path: Path) -> str:
    """'tmpfs file system mounted at /x' or 'ext4 file system /dev/sda1 mounted at /': the one holding `path`."""
    real = os.path.realpath(existing(path))
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
