"""Checkpoint faults in a real 2-rank run under one `deepspeed` launcher (CPU, gloo, DeepSpeed's shm all-reduce):
a disk that fills up during a save, a SIGKILL of the whole run inside a save, and the /dev/shm segments a run
leaves. Slow (launcher start-up, 20-40 s a run on 2 cores), run in CI: the file takes about 2 CPU-minutes, 4
minutes on a 2-core machine shared with other work.

The full disk is a small tmpfs mounted on the run's checkpoints folder (needs root or CAP_SYS_ADMIN; skipped
otherwise), so every write goes through the kernel's real ENOSPC path."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from launcher import (ROOT, free_port, kill_session, mapped_shm, rank_processes, read_train_log, shm_segments,
                      start_deepspeed, tiny_shards, tiny_train_args)

TRAIN = ROOT / "launch/train.py"
BASE = ("model.frm.ep_size=2", "train.eval_on_stop=false")
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


@pytest.fixture
def small_fs():
    """mount(path, size): a tmpfs of `size` on `path`, unmounted after the test."""
    mounted = []

    def mount(path, size: str):
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def start(shards, out, log, *extra, resume=False):
    port = free_port()
    args = tiny_train_args(shards, out, *BASE, *extra) + (["--resume"] if resume else [])
    return start_deepspeed(TRAIN, args, log, master_port=port), port


def finish(proc, log, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        kill_session(proc)
    text = log.read_text()
    assert code is not None, f"still running after {timeout}s\n{text[-4000:]}"
    return code, text


def latest(out) -> str | None:
    p = out / "checkpoints/latest"
    return p.read_text().strip() if p.is_file() else None


def du(path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())


def wait_for(predicate, what: str, proc, timeout: float = RUN_TIMEOUT_S, every: float = 0.05):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.poll()}) while waiting for {what}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def assert_resumes(shards, out, log, tag: str, reference: dict[int, float], until: int):
    """--resume up to step `until`: starts from `tag`, repeats the interrupted run's losses, ends with a
    complete checkpoint, and leaves no shm segment (a normal end)."""
    step = int(tag.removeprefix("step"))
    before = len(read_train_log(out))
    proc, port = start(shards, out, log, f"train.max_steps={until}", f"train.ckpt_every={until - step}", resume=True)
    code, text = finish(proc, log)
    assert code == 0, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / tag} at step {step}" in text, text[-4000:]
    resumed = read_train_log(out)[before:]
    assert [r["step"] for r in resumed] == list(range(step + 1, until + 1))
    # same weights, optimiser state, RNG streams and data position: the steps repeat the first run's
    for r in resumed:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-5, abs=1e-6), r["step"]
    assert latest(out) == f"step{until:08d}"
    assert (out / "checkpoints" / latest(out) / "COMPLETE").is_file()
    assert not shm_segments(port), "a normal run left its DeepSpeed shm segments in /dev/shm"
    return text


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_latest_stops_with_a_message_and_resume_continues(shards, tmp_path, small_fs):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    small_fs(ckpt, "64m")
    junk = ckpt / "junk.bin"
    proc, port = start(shards, out, tmp_path / "full.log", "train.max_steps=8", "train.ckpt_every=1")
    try:
        wait_for(lambda: latest(out) == "step00000001", "the first checkpoint", proc, every=0.01)
        # fill the file system so that about half a checkpoint fits: the save at step 2 runs out of space. The
        # run is stopped meanwhile (a step of the tiny model can take 0.2 s), so the fill is done before it.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            size = du(ckpt / "step00000001")
            free = os.statvfs(ckpt).f_bavail * os.statvfs(ckpt).f_frsize
            junk.write_bytes(b"\0" * (free - size // 2))
            assert not (ckpt / "step00000002").exists(), "the save at step 2 began before the disk was full"
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
    finally:
        code, log = finish(proc, tmp_path / "full.log")
    assert code != 0, log[-4000:]
    assert latest(out) == "step00000001" and (ckpt / "step00000001/COMPLETE").is_file()
    assert not (ckpt / "step00000002").exists(), "the partial checkpoint was left behind"
    line = next((ln for ln in log.replace("\r", "\n").splitlines() if "was not saved" in ln), None)
    assert line is not None, log[-4000:]
    assert re.search(rf"checkpoint step00000002 was not saved: no space left on device on the tmpfs file system "
                     rf"mounted at {re.escape(str(ckpt))} \([\d.]+ MiB free of 64\.0 MiB\) when rank [01] wrote "
                     rf"{re.escape(str(ckpt))}/step00000002/\S+; a checkpoint needs about {size / 2**20:.1f} MiB "
                     rf"\(the size of step00000001\); `latest` still names step00000001: free space there and rerun "
                     rf"with --resume to continue from step 1$", line), line
    assert "Traceback" not in log, log[-4000:]           # one line, not a traceback from every rank
    assert not shm_segments(port)
    reference = {r["step"]: r["loss"] for r in read_train_log(out)}
    assert sorted(reference) == [1, 2]

    junk.unlink()      # free space: the same folder, same file system
    assert_resumes(shards, out, tmp_path / "resume.log", "step00000001", reference, until=2)
    print(f"full disk: {line.split('] ', 1)[-1]}")


def tag_in_progress(out) -> str | None:
    """A tag folder that holds files but no COMPLETE while `latest` names an older one: a save is under way."""
    ckpt = out / "checkpoints"
    done = latest(out)
    if done is None:
        return None
    try:
        for tag in sorted(os.listdir(ckpt)):
            if tag.startswith("step") and tag > done:
                files = os.listdir(ckpt / tag)
                if files and "COMPLETE" not in files:
                    return tag
    except FileNotFoundError:      # rotated or replaced meanwhile
        pass
    return None


@pytest.mark.slow
def test_kill_inside_a_save_then_resume_continues_from_the_previous_checkpoint(shards, tmp_path):
    """SIGKILL of the launcher's whole session (both ranks) while a save writes its files; polled every ms
    after the first checkpoint, so the kill lands in the first save the poller sees under way (a save of the tiny
    model takes ~0.1-0.3 s). A kill that still lands after the `latest` rename (the poller starved) is retried
    with a new run."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        log = tmp_path / f"killed{attempt}.log"
        proc, port = start(shards, out, log, "train.max_steps=12", "train.ckpt_every=1")
        t_start = time.perf_counter()
        try:
            ranks = wait_for(lambda: len(rank_processes(proc)) == 2 and rank_processes(proc), "both ranks", proc)
            wait_for(lambda: latest(out), "the first checkpoint", proc)
            # DeepSpeed made its segments and the ranks map them, already unlinked from /dev/shm
            maps = {r: mapped_shm(p.pid) for r, p in ranks.items()}
            tag = wait_for(lambda: tag_in_progress(out), "a save under way", proc, every=0.001)
            os.killpg(proc.pid, signal.SIGKILL)
            t_kill = time.perf_counter() - t_start
        finally:
            kill_session(proc)
        previous = latest(out)
        if previous < tag:      # `latest` was not replaced: the kill landed inside the save
            break
    else:
        pytest.fail("three kills landed after the save they aimed at")
    files = sorted(os.listdir(out / "checkpoints" / tag))     # COMPLETE too if it landed just before the rename
    for r in (0, 1):
        want = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r} (deleted)"
        assert want in maps[0] and want in maps[1], maps
    assert not shm_segments(port), "SIGKILL left the run's shm segments in /dev/shm"

    reference = {r["step"]: r["loss"] for r in read_train_log(out)}
    until = int(tag.removeprefix("step"))
    assert until in reference, (tag, sorted(reference))
    assert_resumes(shards, out, tmp_path / "resume.log", previous, reference, until=until)
    # the resumed run rewrote the interrupted tag whole: the same files as the complete one before it
    names = sorted(os.listdir(out / "checkpoints" / tag))
    assert names == sorted([*os.listdir(out / "checkpoints" / previous)]), names
    print(f"attempt {attempt + 1}: killed {t_kill:.0f}s after the start, inside the save of {tag} ({len(files)} of "
          f"{len(names)} files there: {files}); resumed from {previous}")


@pytest.mark.slow
def test_a_run_that_fails_with_an_exception_leaves_no_shm_segment_and_stale_ones_go(shards, tmp_path):
    """A Python exception after DeepSpeed made its segments (a DeepSpeed JSON that deepspeed.initialize
    rejects) ends the run; none of its segments stay in /dev/shm. The run also removes a segment that no process
    holds (as a run killed while it started leaves) and keeps one that a live process holds open."""
    ds_json = tmp_path / "bad_ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 0, "no_such_key": 1}}')
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}"
    stale, held = f"{prefix}_test-stale-{os.getpid()}_1_0", f"{prefix}_test-held-{os.getpid()}_1_0"
    for name in (stale, held):
        with open(name, "wb") as f:
            f.write(b"\0" * 4096)
    fd = os.open(held, os.O_RDONLY)
    try:
        proc, port = start(shards, tmp_path / "run", tmp_path / "fail.log", "train.max_steps=4",
                           f"train.deepspeed_config={ds_json}")
        code, log = finish(proc, tmp_path / "fail.log")
        kept, stale_left = os.path.exists(held), os.path.exists(stale)
    finally:
        os.close(fd)
        for name in (stale, held):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
    assert code != 0, log[-4000:]
    assert "deepspeed_shm_comm_op built successfully" in log     # the run did make shm segments
    assert "Traceback" in log and "no_such_key" in log, log[-4000:]
    assert not shm_segments(port), shm_segments(port)
    assert kept, "a segment that a live process holds open was removed"
    assert not stale_left, "a stale segment that no process holds was kept"
