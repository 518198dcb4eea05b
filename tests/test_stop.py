"""Ending a 2-rank run on purpose or by mistake, under the real launcher (launch/ds_run.py, which runs DeepSpeed's
runner as launch/node.sh does):

- a user error before the first step is one `error:` line (rank 0's), exit status 2, no traceback;
- train.max_steps stops with a checkpoint and the final evaluation;
- SIGTERM to the whole process group stops every rank at the same step boundary with a checkpoint and exit
  status 143, and --resume continues with the loss an uninterrupted run has at the next step;
- DeepSpeed's launcher killed by a signal is a non-zero status from our entry point (plain `deepspeed`: 0).

Slow (launcher start-up), run in CI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launcher import (ROOT, deepspeed_bin, free_port, kill_session, read_train_log, remove_shm_buffers,
                      tiny_shards, tiny_train_args)

TRAIN = ROOT / "launch/train.py"
DS_RUN = ROOT / "launch/ds_run.py"
REFERENCE_STEPS = 4     # the uninterrupted run; the SIGTERM run stops at step 2 or 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


def ds_run_cmd(args: list[str], port: int) -> list[str]:
    return [sys.executable, str(DS_RUN), str(deepspeed_bin()), "--num_gpus", "2", "--master_port", str(port),
            str(TRAIN), *args]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    port = free_port()
    try:
        return subprocess.run(ds_run_cmd(args, port), cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers("127.0.0.1", port)


def output(proc) -> str:
    return proc.stdout + proc.stderr


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tag_of(out) -> str | None:
    p = out / "checkpoints/latest"
    return p.read_text().strip() if p.is_file() else None


# ---- (a) user errors before the first step -------------------------------------------------------------------

@pytest.mark.slow
def test_user_errors_are_one_line_from_rank_0_and_exit_2(shards, tmp_path):
    """Four runs at once (they spend their time importing, on both cores): each ends with exit status 2 and
    exactly one `error:` line, rank 0's, and no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n")
    cases = {   # case: (data.shards, overrides, flags, the error line holds)
        "no shards folder": (tmp_path / "nope", [], [], f"shard folder {tmp_path / 'nope'} does not exist"),
        "no manifest": (empty, [], [], f"{empty / 'manifest.json'}: not found"),
        "resume without checkpoint": (shards, [], ["--resume"], "--resume: no complete checkpoint under"),
        "bad pretrained file": (shards, [f"model.pretrained={garbage}"], [], f"{garbage}: not a PyTorch checkpoint"),
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    procs, ports = {}, []
    try:
        for i, (case, (data, overrides, flags, _)) in enumerate(cases.items()):
            ports.append(free_port())
            with open(tmp_path / f"case{i}.log", "w") as f:
                procs[case] = subprocess.Popen(
                    ds_run_cmd(tiny_train_args(data, tmp_path / f"run{i}", *overrides) + flags, ports[-1]),
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        codes = {case: p.wait(timeout=240) for case, p in procs.items()}
    finally:
        for p in procs.values():
            kill_session(p)
        for port in ports:
            remove_shm_buffers("127.0.0.1", port)
    took = time.perf_counter() - t0
    for i, (case, (*_, message)) in enumerate(cases.items()):
        text = (tmp_path / f"case{i}.log").read_text()
        assert codes[case] == 2, (case, codes[case], text[-4000:])
        assert "Traceback" not in text, (case, text[-4000:])
        lines = error_lines(text)
        assert len(lines) == 1 and message in lines[0], (case, lines, text[-3000:])
        print(f"{case}: exit 2: {lines[0]}")
    print(f"four user errors: {took:.1f}s")


# ---- (b) train.max_steps: checkpoint and final evaluation; also the reference for (c) ------------------------

@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run stopped by train.max_steps=REFERENCE_STEPS."""
    out = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.perf_counter()
    proc = run(tiny_train_args(shards, out, f"train.max_steps={REFERENCE_STEPS}"))
    return out, proc, time.perf_counter() - t0


@pytest.mark.slow
def test_max_steps_stop_saves_and_evaluates(reference):
    out, proc, took = reference
    assert proc.returncode == 0, output(proc)[-4000:]
    tag = f"step{REFERENCE_STEPS:08d}"
    assert tag_of(out) == tag and (out / "checkpoints" / tag / "COMPLETE").is_file()
    assert [r["step"] for r in read_train_log(out)] == list(range(1, REFERENCE_STEPS + 1))
    evals = read_jsonl(out / "eval_log.jsonl")
    assert [e["step"] for e in evals] == [REFERENCE_STEPS] and "mAP" in evals[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == evals[0]["mAP"]
    assert f"stopped after step {REFERENCE_STEPS} (train.max_steps={REFERENCE_STEPS})" in output(proc)
    print(f"max_steps run: {took:.1f}s")


# ---- (c) SIGTERM mid-training, then --resume ---------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_continues_exactly(shards, reference, tmp_path):
    ref_out, ref_proc, _ = reference
    assert ref_proc.returncode == 0, output(ref_proc)[-3000:]
    losses = {r["step"]: r["loss"] for r in read_train_log(ref_out)}
    out = tmp_path / "run"
    port = free_port()
    log = tmp_path / "sigterm.log"
    with open(log, "w") as f:
        # train.eval_on_stop=false: the step in flight, the checkpoint and the exit must fit in DeepSpeed's 30 s
        # from SIGTERM to SIGKILL on a loaded 2-core machine too; an evaluation after a stop is test (b)'s
        args = tiny_train_args(shards, out, "train.max_steps=40", "train.eval_on_stop=false")
        proc = subprocess.Popen(ds_run_cmd(args, port), cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        while not (out / "train_log.jsonl").is_file() or not read_train_log(out):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.perf_counter() - t0 < 240, "no step logged in 240 s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)     # as SLURM or `kill -TERM -PGID`: runner, launcher, ranks, workers
        t_sig = time.perf_counter()
        code = proc.wait(timeout=60)
        took = time.perf_counter() - t_sig
    finally:
        kill_session(proc)
        remove_shm_buffers("127.0.0.1", port)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, (code, text[-4000:])
    assert "Traceback" not in text, text[-4000:]
    logged = [r["step"] for r in read_train_log(out)]
    stop = logged[-1]
    assert 2 <= stop < REFERENCE_STEPS, logged           # the step in flight when the signal came, then stop
    assert tag_of(out) == f"step{stop:08d}" and (out / "checkpoints" / f"step{stop:08d}" / "COMPLETE").is_file()
    assert f"stopped after step {stop} (SIGTERM)" in text, text[-3000:]
    assert not (out / "eval_log.jsonl").exists()
    assert losses[stop] == pytest.approx(read_train_log(out)[-1]["loss"], rel=1e-5, abs=1e-6)

    t_resume = time.perf_counter()
    resumed = run(tiny_train_args(shards, out, f"train.max_steps={stop + 1}", "train.eval_on_stop=false")
                  + ["--resume"])
    assert resumed.returncode == 0, output(resumed)[-4000:]
    assert f"at step {stop}" in output(resumed)
    after = read_train_log(out)
    assert [r["step"] for r in after[len(logged):]] == [stop + 1]
    assert after[-1]["loss"] == pytest.approx(losses[stop + 1], rel=1e-5, abs=1e-6)
    print(f"SIGTERM at step {stop}: exit 143 {took:.1f}s after the signal; "
          f"resume {time.perf_counter() - t_resume:.1f}s")


# ---- (d) the launcher killed by a signal -------------------------------------------------------------------

def launcher_of(proc: subprocess.Popen) -> psutil.Process | None:
    """DeepSpeed's launcher (python -m deepspeed.launcher.launch) under proc, once it has started its ranks."""
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            if "deepspeed.launcher.launch" in " ".join(p.cmdline()) and p.children():
                return p
    except psutil.NoSuchProcess:
        pass
    return None


def left_in_session(sid: int) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except (OSError, psutil.Error):
            continue
    return left


@pytest.mark.slow
def test_launcher_killed_by_a_signal_is_a_failure(shards, tmp_path):
    """SIGKILL to DeepSpeed's launcher once it started its rank: plain `deepspeed` exits 0 and leaves the rank
    running; launch/node.sh (launch/ds_run.py) stops the rank and exits 137. Both at once."""
    args = tiny_train_args(shards, tmp_path / "run", "model.frm.ep_size=1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ports = [free_port(), free_port()]
    starts = {"plain": ([str(deepspeed_bin()), "--num_gpus", "1", "--master_port", str(ports[0]), str(TRAIN), *args],
                        env),
              "node": ([str(ROOT / "launch/node.sh"), *args],
                       {**env, "DEEPSPEED": str(deepspeed_bin()), "NUM_NODES": "1", "NODE_RANK": "0",
                        "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[1])})}
    procs = {}
    try:
        for name, (cmd, e) in starts.items():
            with open(tmp_path / f"{name}.log", "w") as f:
                procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        killed, t0 = set(), time.perf_counter()
        while len(killed) < len(procs):
            for name, proc in procs.items():
                if name not in killed and (launcher := launcher_of(proc)) is not None:
                    launcher.send_signal(signal.SIGKILL)      # the OOM killer, or anyone's kill -9
                    killed.add(name)
            assert all(p.poll() is None for n, p in procs.items() if n not in killed), \
                {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in procs}
            assert time.perf_counter() - t0 < 120, "no launcher started its rank in 120 s"
            time.sleep(0.05)
        codes = {name: proc.wait(timeout=90) for name, proc in procs.items()}
        left = {name: left_in_session(proc.pid) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            kill_session(proc)                       # the orphaned ranks are still in the session
        for port in ports:
            remove_shm_buffers("127.0.0.1", port)
    node_log = (tmp_path / "node.log").read_text()
    assert codes["plain"] == 0, f"DeepSpeed's runner now exits {codes['plain']} for a launcher killed by SIGKILL"
    assert codes["node"] == 128 + signal.SIGKILL, (codes, node_log[-3000:])
    assert "the DeepSpeed launcher" in node_log and "was killed by SIGKILL" in node_log, node_log[-3000:]
    assert not left["node"], [p.cmdline() for p in left["node"]]
    print(f"launcher SIGKILLed: plain deepspeed exit {codes['plain']} leaving {len(left['plain'])} processes; "
          f"node.sh exit {codes['node']} leaving none")
