"""Run a script under the real `deepspeed` launcher with N local processes (CPU: gloo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(script: str | Path, args: list[str], nprocs: int = 2, timeout: float = 600,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    cmd = [str(deepspeed), "--num_gpus", str(nprocs), "--master_port", str(port), str(script), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers("127.0.0.1", port)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


# ---- helpers for the multi-node, fault and re-sharding tests -------------------------------------------

TINY = ["model.img_size=[64,32]", "train.global_batch=16", "data.num_instances=4", "data.num_workers=1",
        "tracking.enabled=false", "train.eval_first=false", "train.eval_missing=false", "train.eval_every=100",
        "train.log_every=1"]


def tiny_shards(tmp_path_factory) -> Path:
    """RGBNT201-layout shards: 12 training ids x 3 cameras x 3 images = 108 samples in 4 shards."""
    from mfrnet_ds.shards import build
    from mfrnet_ds.synth import make_tree

    root = tmp_path_factory.mktemp("raw201")
    make_tree("rgbnt201", root, ids=24, cams=3, per_cam=3, seed=5)
    out = tmp_path_factory.mktemp("shards201")
    build("rgbnt201", root, out, maxcount=32)
    return out


def tiny_train_args(shards, out_dir, *extra) -> list[str]:
    """launch/train.py arguments for the tiny demo model (a few seconds per step on 2 CPU processes)."""
    return ["--config", str(ROOT / "configs/demo.yaml"), f"data.shards={shards}", f"train.out_dir={out_dir}",
            *TINY, *extra]


def read_train_log(out_dir) -> list[dict]:
    import json
    return [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]


def deepspeed_bin() -> Path:
    return Path(sys.executable).with_name("deepspeed")


def start_deepspeed(script: str | Path, args: list[str], log_file: Path, nprocs: int = 2,
                    master_port: int | None = None, env: dict | None = None) -> subprocess.Popen:
    """Like run_deepspeed, but returns at once; output goes to log_file. The launcher leads its own
    session, so kill_session() stops it and everything it started."""
    cmd = [str(deepspeed_bin()), "--num_gpus", str(nprocs), "--master_port", str(master_port or free_port()),
           str(script), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_file, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the session a start_*() call made (the launcher and its ranks), if anything is left of it."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def rank_processes(proc: subprocess.Popen) -> dict[int, "psutil.Process"]:
    """Global rank -> the training process among proc's descendants: the one the launcher gave --local_rank,
    not its DataLoader workers (forked, so they carry the same command line and environment)."""
    import psutil

    def is_rank(p) -> bool:
        return any(a.startswith("--local_rank") for a in p.cmdline())

    ranks = {}
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return ranks
    for child in children:
        try:
            parent = child.parent()
            if is_rank(child) and not (parent and is_rank(parent)):
                ranks[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            continue
    return ranks


def remove_shm_buffers(master_addr: str, master_port: int) -> None:
    """DeepSpeed's CPU backend leaves two 66 MB /dev/shm segments per single-node run
    (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>) and never unlinks them: remove ours."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_*"):
        f.unlink(missing_ok=True)


def shm_segments(master_port: int, master_addr: str = "127.0.0.1") -> list[Path]:
    """The DeepSpeed CPU shm segments of the run that met at master_addr:master_port still in /dev/shm."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_*"))


def mapped_shm(pid: int) -> list[str]:
    """The DeepSpeed shm files process `pid` maps, as /proc/PID/maps names them ('... (deleted)' once unlinked)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sorted({line.split(maxsplit=5)[5].strip() for line in f if "deepspeed_allreduce_buffer" in line})
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return []
