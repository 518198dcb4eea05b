"""launch/slurm.sbatch and launch/multinode_ssh.sh (pdsh) on a real two-node cluster (tests/cluster.py: network
namespaces n1/n2, munge, slurmctld, a slurmd and an sshd per node). Each trains the tiny demo model with its FRM
experts split over the two nodes (one CPU process per node, ep_size 2), checkpoints, and resumes: SLURM after
`scancel` (SIGTERM: the ranks save and exit 143), pdsh after a run that ends at train.max_steps (never signal
the pdsh launcher here: DeepSpeed's runner answers with `pkill -f` on every host, and the namespaces share the
machine's process table). Same seed and data: both launchers must log the same losses.
Needs root and the Debian packages (`make test` installs them as root); skipped with the reason otherwise."""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster import NAMES, Cluster, NoNamespaces, missing
from launcher import ROOT, read_train_log, tiny_shards, tiny_train_args

MARKER = "MLFLOW_CLUSTER_TEST"       # forwarded like MLFLOW_TRACKING_URI; a space and `?` must arrive intact
MARKER_VALUE = "run a?b=1"
COMMON = ("model.frm.ep_size=2", "train.collective_timeout_s=120", "train.eval_on_stop=false")
RUNS: dict[str, list[dict]] = {}     # launcher -> its train_log, for the cross-launcher comparison


@pytest.fixture(scope="module")
def cluster():
    reason = missing()
    if reason:
        pytest.skip(reason)
    c = Cluster()
    try:
        c.up()
    except NoNamespaces as e:
        c.down()
        pytest.skip(str(e))
    except BaseException:
        c.down()
        raise
    yield c
    c.down()


def report(capsys, line: str) -> None:
    """Wall times on the terminal with or without -s (make test runs pytest -q)."""
    with capsys.disabled():
        print(f"\n{line}", flush=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


class RankWatch:
    """Every training rank whose command line names `out_dir`: global rank -> (node it runs on, MARKER it sees).
    The ranks are not our children (slurmd and sshd start them), so this scans the process table."""

    def __init__(self, cluster: Cluster, out_dir: Path):
        self.cluster, self.needle, self.seen = cluster, f"train.out_dir={out_dir}", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil
        while not self._stop.wait(0.5):
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if self.needle not in cmd or not any(a.startswith("--local_rank") for a in cmd):
                    continue
                try:
                    env = p.environ()
                    self.seen.setdefault(int(env["RANK"]), (self.cluster.netns_of(p.pid), env.get(MARKER)))
                except (psutil.Error, KeyError, ValueError):
                    pass


def _check_run(out: Path, first_step: int, last_step: int, seen: dict) -> list[dict]:
    assert seen == {0: ("n1", MARKER_VALUE), 1: ("n2", MARKER_VALUE)}, seen
    log = [r for r in read_train_log(out) if first_step <= r["step"]]
    assert [r["step"] for r in log] == list(range(first_step, last_step + 1)), [r["step"] for r in log]
    assert all(math.isfinite(r["loss"]) for r in log), log
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert tag == f"step{last_step:08d}" and (ckpts / tag / "COMPLETE").is_file(), tag
    # FRM experts 0, 1 live on rank 0 (n1), 2, 3 on rank 1 (n2): each file proves its node wrote it
    frm = sorted(p.name for p in (ckpts / tag).glob("layer_0_expert_*_mp_rank_00_model_states.pt"))
    assert frm == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)], frm
    for r in (0, 1):
        assert (ckpts / tag / f"expp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
    return log


# ---- SLURM ------------------------------------------------------------------------------------------------

def _sbatch(c: Cluster, name: str, args: list[str]) -> str:
    r = c.client(["sbatch", "--parsable", "--job-name", name, "--cpus-per-task", "1", "launch/slurm.sbatch",
                  *args], cwd=ROOT, env=c.env(**{MARKER: MARKER_VALUE, "PYTHONUNBUFFERED": "1"}))
    return r.stdout.strip().split(";")[0]


def _wait_job(c: Cluster, job: str, timeout: float, out_file: Path, until=None) -> None:
    """Until the job has left the queue (or `until()` holds); fails with the job's output on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if until is not None and until():
            return
        if until is None and not c.client(["squeue", "-h", "-j", job], check=False).stdout.strip():
            return
        time.sleep(1)
    text = out_file.read_text()[-5000:] if out_file.exists() else "(no output file)"
    pytest.fail(f"job {job} still running after {timeout:.0f}s\n{text}")


def _take_job_files(out_file: Path) -> str:
    """The job's output; its files under the repository's logs/ removed (output, hostfile, node statuses)."""
    text = out_file.read_text() if out_file.exists() else ""
    for f in (out_file, out_file.with_suffix(".hostfile")):
        f.unlink(missing_ok=True)
    shutil.rmtree(out_file.with_suffix(".status"), ignore_errors=True)
    return text


@pytest.mark.slow
def test_slurm_trains_across_two_nodes_and_resumes_after_scancel(cluster, shards, tmp_path, capsys):
    out = tmp_path / "run"
    name = f"mfc{os.getpid()}"
    t0 = time.perf_counter()
    args = tiny_train_args(shards, out, *COMMON, "train.max_steps=40")
    with RankWatch(cluster, out) as watch:
        job = _sbatch(cluster, name, args)
        out_file = ROOT / "logs" / f"{name}-{job}.out"       # the script's default --output
        try:
            # cancel once a step is logged: SLURM sends SIGTERM, the ranks save after the same step
            _wait_job(cluster, job, 240, out_file, until=lambda: (out / "train_log.jsonl").exists())
            cluster.client(["scancel", job])
            _wait_job(cluster, job, 120, out_file)
        finally:
            text = _take_job_files(out_file)
    t_first = time.perf_counter() - t0
    assert f"job {job}, 2 nodes x 1 processes, 1 CPUs per node, master {cluster.addr[0]}:" in text, text[-3000:]
    assert "nodes exited 143 143" in text, text[-3000:]       # stopped by SIGTERM with a checkpoint, both nodes
    assert "stopped after step" in text, text[-3000:]
    stopped = read_train_log(out)[-1]["step"]
    first = _check_run(out, 1, stopped, watch.seen)

    t1 = time.perf_counter()
    args = tiny_train_args(shards, out, *COMMON, f"train.max_steps={stopped + 2}", "--resume")
    with RankWatch(cluster, out) as watch:
        job = _sbatch(cluster, name, args)
        out_file = ROOT / "logs" / f"{name}-{job}.out"
        try:
            _wait_job(cluster, job, 240, out_file)
        finally:
            text = _take_job_files(out_file)
    t_resume = time.perf_counter() - t1
    assert "nodes exited 0 0" in text and "job exits 0" in text, text[-3000:]
    assert f"resumed from {out / 'checkpoints'}/step{stopped:08d} at step {stopped}" in text, text[-3000:]
    resumed = _check_run(out, stopped + 1, stopped + 2, watch.seen)
    RUNS["slurm"] = first + resumed
    report(capsys, f"cluster up in {cluster.setup_s:.1f}s; slurm run: {t_first:.1f}s to scancel at step {stopped}, "
           f"resume: {t_resume:.1f}s, losses {[round(r['loss'], 4) for r in first + resumed]}")


@pytest.mark.slow
def test_slurm_job_exits_with_the_training_status(cluster, shards, tmp_path, capsys):
    """A bad override fails both nodes with the trainer's exit 2 (one `error:` line): the job's exit code is 2."""
    name = f"mfc{os.getpid()}"
    t0 = time.perf_counter()
    job = _sbatch(cluster, name, tiny_train_args(shards, tmp_path / "run", "train.max_steps=oops"))
    out_file = ROOT / "logs" / f"{name}-{job}.out"
    try:
        _wait_job(cluster, job, 120, out_file)
        info = cluster.client(["scontrol", "show", "job", job]).stdout
    finally:
        text = _take_job_files(out_file)
    assert "error:" in text and "train.max_steps" in text, text[-3000:]
    assert "job exits 2" in text and "ExitCode=2:0" in info, (text[-2000:], info)
    report(capsys, f"slurm failing job: {time.perf_counter() - t0:.1f}s")


# ---- pdsh / ssh -------------------------------------------------------------------------------------------

def _pdsh_run(c: Cluster, hostfile: Path, args: list[str], log: Path, timeout: float = 240) -> int:
    """launch/multinode_ssh.sh started on n1; on timeout SIGKILL (never SIGTERM/SIGINT: see the module doc)."""
    with open(log, "w") as f:
        p = c.on_node(0, ["launch/multinode_ssh.sh", "--hostfile", str(hostfile), *args], cwd=ROOT,
                      env=c.env(**{MARKER: MARKER_VALUE, "PYTHONUNBUFFERED": "1"}), stdout=f,
                      stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"multinode_ssh.sh still running after {timeout:.0f}s\n{log.read_text()[-5000:]}")


@pytest.mark.slow
def test_pdsh_trains_across_two_nodes_and_resumes(cluster, shards, tmp_path, capsys):
    out = tmp_path / "run"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{n} slots=1\n" for n in NAMES))
    runs = []
    for i, extra in enumerate((["train.max_steps=3"], ["train.max_steps=5", "--resume"])):
        log = tmp_path / f"pdsh{i}.log"
        t0 = time.perf_counter()
        with RankWatch(cluster, out) as watch:
            code = _pdsh_run(cluster, hostfile, tiny_train_args(shards, out, *COMMON, *extra), log)
        wall = time.perf_counter() - t0
        text = log.read_text()
        assert code == 0, f"exit {code}\n{text[-5000:]}"
        assert f"master {cluster.addr[0]}:29500, interface mfc0" in text, text[-3000:]
        # the op was built before the ranks started: no rank compiled it (they only load it)
        assert "launch/build_ops.py: DeepSpeed CPU op ready" in text and "Building extension" not in text
        runs.append(_check_run(out, 1 + 3 * i, 3 + 2 * i, watch.seen))
        report(capsys, f"pdsh run {i}: {wall:.1f}s")
    assert f"resumed from {out / 'checkpoints'}/step00000003 at step 3" in text, text[-3000:]
    RUNS["pdsh"] = runs[0] + runs[1]
    # the env file multinode_ssh.sh wrote: named by its content, which holds this session's PATH
    env_file = text.split(", env file ", 1)[1].split()[0]
    assert Path(env_file).read_text().startswith("PATH=") and "TORCH_EXTENSIONS_DIR=" in Path(env_file).read_text()
    Path(env_file).unlink()


def test_same_losses_under_slurm_and_pdsh(cluster):
    """Same seed, data and layout: the launcher must not change what is trained."""
    missing_runs = {"slurm", "pdsh"} - RUNS.keys()
    assert not missing_runs, f"no complete run for {missing_runs} in this session (see the tests above)"
    slurm = {r["step"]: r["loss"] for r in RUNS["slurm"]}
    pdsh = {r["step"]: r["loss"] for r in RUNS["pdsh"]}
    common = sorted(slurm.keys() & pdsh.keys())
    assert len(common) >= 4, (slurm, pdsh)
    assert [slurm[s] for s in common] == pytest.approx([pdsh[s] for s in common], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("value", ["pa$$word", "a`id`b", 'say "hi"', "back\\slash"])
def test_multinode_ssh_refuses_only_what_pdsh_cannot_pass(value, tmp_path):
    """`$`, backticks, `"` and `\\` are refused, naming the variable, with advice that works. (A space and `?`
    pass: the pdsh test above sends MARKER_VALUE through.)"""
    if shutil.which("pdsh") is None:
        pytest.skip("pdsh not installed (as root, `make cluster-packages` installs it)")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=1\n")
    r = subprocess.run([str(ROOT / "launch/multinode_ssh.sh"), "--hostfile", str(hostfile), "--config", "x.yaml"],
                       env={**os.environ, "MLFLOW_TRACKING_PASSWORD": value}, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "MLFLOW_TRACKING_PASSWORD contains" in r.stderr and "~/.mlflow/credentials" in r.stderr, r.stderr
