"""Two nodes simulated on this machine: two network namespaces joined by a veth pair with private addresses
made here, one `deepspeed --no_ssh` node in each (launch/node.sh), one CPU process per node, the FRM experts
split over both (ep_size 2). Needs root for `ip netns`; skipped with the reason otherwise. Slow (launcher
start-up), run in CI."""
from __future__ import annotations

import math
import os
import subprocess
import time

import pytest

from launcher import ROOT, deepspeed_bin, rank_processes, read_train_log, tiny_shards, tiny_train_args

STEPS = 5
MARKER = "MLFLOW_MULTINODE_TEST"     # a variable every rank must see: what MLFLOW_TRACKING_URI etc. rely on


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class TwoNodes:
    """Namespaces <prefix>a / <prefix>b, veth <prefix>a / <prefix>b in them, 10.231.X.1 and .2 on a /30."""

    def __init__(self):
        pid = os.getpid()
        self.ns = (f"mfrns{pid}a", f"mfrns{pid}b")
        self.veth = (f"mfv{pid}a", f"mfv{pid}b")          # interface names are at most 15 characters
        self.addr = (f"10.231.{pid % 256}.1", f"10.231.{pid % 256}.2")
        self.made: list[str] = []

    def up(self) -> None:
        for ns in self.ns:
            self._must("netns", "add", ns)
            self.made.append(ns)
        # created inside the first namespace, so nothing is ever added to the machine's own network
        self._must("-n", self.ns[0], "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        self._must("-n", self.ns[0], "link", "set", self.veth[1], "netns", self.ns[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addr):
            self._must("-n", ns, "addr", "add", f"{addr}/30", "dev", veth)
            self._must("-n", ns, "link", "set", veth, "up")
            self._must("-n", ns, "link", "set", "lo", "up")   # a node reaches its own address through lo

    def down(self) -> None:
        for ns in reversed(self.made):   # deleting a namespace deletes the veth end inside it, and its peer
            _ip("netns", "del", ns)
        self.made.clear()

    def tx_bytes(self, node: int) -> int:
        out = _ip("-n", self.ns[node], "-s", "-j", "link", "show", self.veth[node])
        import json
        return json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"]

    def _must(self, *args: str) -> None:
        r = _ip(*args)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@pytest.fixture
def nodes():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    net = TwoNodes()
    try:
        net.up()
    except (RuntimeError, FileNotFoundError) as e:
        net.down()
        pytest.skip(f"cannot make network namespaces here: {e}")
    yield net
    net.down()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


@pytest.mark.slow
def test_two_nodes_train_and_checkpoint_across_namespaces(nodes, shards, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(shards, out, "model.frm.ep_size=2", f"train.max_steps={STEPS}",
                           "train.collective_timeout_s=60")
    procs, logs = [], []
    t0 = time.perf_counter()
    try:
        for node in (0, 1):
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEEPSPEED": str(deepspeed_bin()),
                   "NUM_NODES": "2", "NODE_RANK": str(node), "NPROC_PER_NODE": "1",
                   "MASTER_ADDR": nodes.addr[0], "MASTER_PORT": "29500",
                   "GLOO_SOCKET_IFNAME": nodes.veth[node], MARKER: f"node{node}"}
            logs.append(tmp_path / f"node{node}.log")
            with open(logs[-1], "w") as f:
                procs.append(subprocess.Popen(["ip", "netns", "exec", nodes.ns[node], "launch/node.sh", *args],
                                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        seen_env = {}
        while any(p.poll() is None for p in procs) and time.perf_counter() - t0 < 240:
            for p in procs:
                for rank, proc in rank_processes(p).items():
                    try:
                        seen_env.setdefault(rank, proc.environ().get(MARKER))
                    except Exception:   # the process ended between listing and reading
                        pass
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    wall = time.perf_counter() - t0
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], f"node exit codes {codes} after {wall:.0f}s\n" + \
        "\n".join(f"--- node{i}\n{t[-4000:]}" for i, t in enumerate(text))
    for node, t in enumerate(text):
        assert f"node {node} of 2, master {nodes.addr[0]}:29500" in t
        assert "exits successfully" in t, t[-2000:]
    # rank 0 ran in the first namespace, rank 1 in the second, each seeing its node's environment
    assert seen_env == {0: "node0", 1: "node1"}, seen_env
    # the traffic went over the veth pair (all-to-all of the experts, gradient all-reduce): megabytes each way
    assert nodes.tx_bytes(0) > 1e6 and nodes.tx_bytes(1) > 1e6, (nodes.tx_bytes(0), nodes.tx_bytes(1))

    log = read_train_log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in log]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert tag == f"step{STEPS:08d}" and (ckpts / tag / "COMPLETE").is_file()
    # FRM (layer 0): experts 0, 1 live on rank 0, experts 2, 3 only on rank 1, so each file proves its writer
    frm = sorted(p.name for p in (ckpts / tag).glob("layer_0_expert_*_mp_rank_00_model_states.pt"))
    assert frm == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)], frm
    for r in (0, 1):
        assert (ckpts / tag / f"expp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
        assert (ckpts / tag / f"rng_rank{r}.pt").is_file()
    print(f"two-node run: {wall:.1f}s wall, losses {[round(x, 3) for x in losses]}")


@pytest.mark.parametrize("script", ["launch/node.sh", "launch/multinode_ssh.sh", "launch/slurm.sbatch",
                                    "launch/ifname.sh"])
def test_launch_script_parses(script):
    r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("settings, message", [
    ({}, "NUM_NODES (or --num-nodes) is not set"),
    ({"NUM_NODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK=2: expected 0 .. 1"),
    ({"NUM_NODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR (or --master-addr) is not set"),
    ({"NUM_NODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "http"},
     "MASTER_PORT=http: expected a TCP port"),
    ({"NUM_NODES": "3", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "HOSTFILE": str(ROOT / "launch/hostfile.example")},
     "lists 2 nodes but NUM_NODES=3"),
])
def test_node_script_names_the_missing_or_bad_setting(settings, message):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUM_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NPROC_PER_NODE")}
    env["DEEPSPEED"] = str(deepspeed_bin())
    r = subprocess.run([str(ROOT / "launch/node.sh"), "--config", "configs/demo.yaml"], env={**env, **settings},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
