"""Faults in a 2-rank run: a rank that dies or freezes must stop the whole run within a bounded time with a
message, never a hang, and the run must resume from its last complete checkpoint as if nothing happened.

Each rank runs under its own launcher (launch/node.sh, two `--no_ssh` nodes on loopback), as on two machines:
a launcher only watches its own processes, so the surviving rank has to notice the failure by itself (a
closed connection, or train.collective_timeout_s). Slow (launcher start-up), run in CI."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from launcher import (ROOT, deepspeed_bin, free_port, kill_session, rank_processes, read_train_log,
                      remove_shm_buffers, run_deepspeed, tiny_shards, tiny_train_args)
from mfrnet_ds.engine.ckpt import merged_state_dict

TRAIN = ROOT / "launch/train.py"
TIMEOUT_S = 30          # train.collective_timeout_s
EXIT_BOUND_S = 60       # a dead peer is noticed at the next collective; a frozen one after TIMEOUT_S


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


def start_two_nodes(shards, out, logs_dir, *extra) -> list[subprocess.Popen]:
    args = tiny_train_args(shards, out, "model.frm.ep_size=2", "train.max_steps=40", "train.ckpt_every=2",
                           f"train.collective_timeout_s={TIMEOUT_S}", *extra)
    port = free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEEPSPEED": str(deepspeed_bin()), "NUM_NODES": "2",
               "NODE_RANK": str(node), "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs_dir / f"node{node}.log", "w") as f:
            procs.append(subprocess.Popen([str(ROOT / "launch/node.sh"), *args], cwd=ROOT, env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_for(predicate, what: str, procs, timeout: float = 240):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a node exited ({[p.poll() for p in procs]}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def logged_steps(out) -> list[int]:
    try:
        return [r["step"] for r in read_train_log(out)]
    except (FileNotFoundError, ValueError):   # not written yet, or a line half written
        return []


def latest_step(out) -> int | None:
    p = out / "checkpoints/latest"
    return int(p.read_text().strip().removeprefix("step")) if p.is_file() else None


def wait_exit(proc: subprocess.Popen, bound: float) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t0 < bound:
        time.sleep(0.2)
    return proc.poll(), time.perf_counter() - t0


def checkpoint_in_step(out) -> int | None:
    """The latest checkpoint's step once the step after it is logged too (the reference for the resume)."""
    latest = latest_step(out)
    return latest if latest is not None and latest + 1 in logged_steps(out) else None


@pytest.mark.slow
def test_killed_rank_stops_the_run_and_it_resumes_from_the_last_complete_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    procs = start_two_nodes(shards, out, tmp_path)
    try:
        wait_for(lambda: len(rank_processes(procs[0])) == 1 and len(rank_processes(procs[1])) == 1,
                 "both ranks to start", procs)
        victim = rank_processes(procs[1])[1]
        wait_for(lambda: checkpoint_in_step(out), "a checkpoint and the step after it", procs)
        victim.send_signal(signal.SIGKILL)
        t_kill = time.perf_counter()
        to_kill = t_kill - t0
        while any(p.poll() is None for p in procs) and time.perf_counter() - t_kill < EXIT_BOUND_S:
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        took = time.perf_counter() - t_kill
    finally:
        for p in procs:
            kill_session(p)
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert None not in codes, f"node exit codes {codes}: still running {EXIT_BOUND_S}s after the kill\n{logs[0][-3000:]}"
    assert codes[0] != 0 and codes[1] != 0, codes
    # the survivor says why it stopped: gloo saw the dead peer's connection close
    assert "caused by a remote worker" in logs[0] or "Connection reset by peer" in logs[0], logs[0][-3000:]
    assert "exits with return code = -9" in logs[1], logs[1][-3000:]     # the victim's own launcher

    tag_step = latest_step(out)
    tag_dir = out / "checkpoints" / f"step{tag_step:08d}"
    assert (tag_dir / "COMPLETE").is_file()
    before = read_train_log(out)
    reference = {r["step"]: r["loss"] for r in before}
    assert tag_step + 1 in reference, (tag_step, sorted(reference))
    # every expert file is there and loads: FRM experts 0-3 (2, 3 written by rank 1), FFM A and B 0-2
    files = sorted(f.name for f in tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert files == [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
                     for layer, n in ((0, 4), (1, 3), (2, 3)) for e in range(n)], files
    saved, _ = merged_state_dict(tag_dir)
    assert any("deepspeed_experts.3." in k for k in saved)

    t_resume = time.perf_counter()
    proc = run_deepspeed(TRAIN, tiny_train_args(shards, out, "model.frm.ep_size=2", f"train.max_steps={tag_step + 2}",
                                                "train.ckpt_every=2") + ["--resume"], nprocs=2, timeout=300)
    remove_shm_buffers("127.0.0.1", int(proc.args[proc.args.index("--master_port") + 1]))
    assert f"resumed from {tag_dir} at step {tag_step}" in proc.stdout + proc.stderr
    resumed = read_train_log(out)[len(before):]
    assert [r["step"] for r in resumed] == [tag_step + 1, tag_step + 2]
    # same weights, optimiser state, RNG streams and data position: the first step repeats the killed run's
    assert resumed[0]["loss"] == pytest.approx(reference[tag_step + 1], rel=1e-5, abs=1e-6)
    after, _ = merged_state_dict(tag_dir)      # resuming read the checkpoint and left it as it was
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)
    assert (out / "checkpoints/latest").read_text().strip() == f"step{tag_step + 2:08d}"
    print(f"killed at step {max(reference)} (checkpoint {tag_step}) {to_kill:.1f}s after the start; nodes exited "
          f"{took:.1f}s after the kill; resume took {time.perf_counter() - t_resume:.1f}s")


@pytest.mark.slow
def test_frozen_rank_makes_the_other_time_out(shards, tmp_path):
    """A rank that stops answering (SIGSTOP: a hung device or node) keeps its connections open; the other
    rank must give up after train.collective_timeout_s, in every collective, the MoE all-to-all included."""
    out = tmp_path / "run"
    procs = start_two_nodes(shards, out, tmp_path)
    try:
        wait_for(lambda: len(rank_processes(procs[1])) == 1, "rank 1 to start", procs)
        victim = rank_processes(procs[1])[1]
        wait_for(lambda: checkpoint_in_step(out), "a checkpoint and the step after it", procs)
        victim.send_signal(signal.SIGSTOP)
        code, took = wait_exit(procs[0], TIMEOUT_S + EXIT_BOUND_S)
    finally:
        for p in procs:
            kill_session(p)     # SIGKILL also ends the stopped rank
    log0 = (tmp_path / "node0.log").read_text()
    assert code is not None, (f"rank 0 still waiting {took:.0f}s after rank 1 froze, although "
                              f"train.collective_timeout_s={TIMEOUT_S}: DeepSpeed makes its expert- and "
                              f"data-parallel groups with dist.new_group(ranks), which takes torch's default "
                              f"timeout (30 min gloo, 10 min NCCL) unless init_distributed changes that "
                              f"default\n{log0[-3000:]}")
    assert code != 0 and "Timed out" in log0, log0[-3000:]
    assert took < TIMEOUT_S + EXIT_BOUND_S
    print(f"rank 0 gave up {took:.1f}s after rank 1 froze (timeout {TIMEOUT_S}s)")
