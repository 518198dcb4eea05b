"""A real two-node cluster on this machine, for the launch tests: network namespaces as nodes n1 and n2 on a veth
pair with addresses made here, munge, one slurmctld, one slurmd per node, one sshd per node (for pdsh).

    with Cluster() as c:                       # or c = Cluster(); c.up() ... c.down()
        c.on_node(0, ["launch/multinode_ssh.sh", ...])   # argv as run on n1: own hostname, own /etc/hosts
        c.client(["sbatch", ...])                         # SLURM commands, from n1's network

Needs root and Debian's slurm-wlm, munge, pdsh and openssh-server (`make cluster-packages`); `missing()` says
what is not there, for a skip reason. Facts behind the choices: /work/shared/docs/CLUSTER.md, docs/MULTINODE.md.
- A node is entered with `nsenter --net` + `unshare --mount --uts`, not `ip netns exec`: that one remounts /sys,
  which hides the cgroup mounts slurmd checks. The node's own mount namespace carries its /etc/hosts (a bind
  mount that disappears with its processes) and its UTS namespace its hostname.
- Every name made here carries `mfc<pid>` so two test sessions (or the no-ssh test's `TwoNodes`) never meet.
  The namespaces share the machine's process table: teardown kills exactly the processes inside our network
  namespaces (`ip netns pids`), never by name.
- Inside each namespace the interface has the same name (IFACE), as on a cluster whose nodes are alike; the
  pdsh path passes one GLOO_SOCKET_IFNAME to every node.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

IFACE = "mfc0"
NAMES = ("n1", "n2")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "pdsh", "sshd", "ssh-keygen", "nsenter", "unshare",
            "runuser", "ip")
PATH_EXTRA = "/usr/sbin:/usr/bin:/sbin:/bin"


class NoNamespaces(RuntimeError):
    """`ip netns add` failed: this root cannot make network namespaces (a container without CAP_NET_ADMIN)."""


def missing() -> str | None:
    """Why the cluster cannot be built here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "the SLURM/pdsh cluster needs root (network namespaces, daemons)"
    path = f"{os.environ.get('PATH', '')}:{PATH_EXTRA}"
    absent = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (as root, `make cluster-packages` installs them)"
    return None


def _run(argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _must(argv: list[str], timeout: float = 30, **kw) -> str:
    r = _run(argv, timeout, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}")
    return r.stdout


class Cluster:
    def __init__(self):
        pid = os.getpid()
        self.prefix = f"mfc{pid}"
        self.ns = tuple(f"{self.prefix}{n}" for n in NAMES)
        net = f"10.77.{pid % 250 + 1}"
        self.addr = (f"{net}.1", f"{net}.2")
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}."))
        self.dir.chmod(0o755)            # munged (user munge) must reach its directory below
        self.conf = self.dir / "slurm.conf"
        self.bin = self.dir / "bin"      # an `ssh` that knows this cluster's key and hosts, for pdsh and DeepSpeed
        self.daemons: list[subprocess.Popen] = []
        self.made_ns: list[str] = []

    # ---- the environment for commands run in the cluster -------------------------------------------------
    def env(self, **extra: str) -> dict:
        """os.environ plus what SLURM's and ssh's clients need; the wrapper ssh comes first on PATH."""
        path = f"{self.bin}:{os.environ.get('PATH', '')}:{PATH_EXTRA}"
        return {**os.environ, "PATH": path, "SLURM_CONF": str(self.conf), "PDSH_RCMD_TYPE": "ssh", **extra}

    def node_argv(self, node: int, argv: list[str], hostname: str | None = None) -> list[str]:
        """argv as run on a node: its network, its own mount and UTS namespaces with its hostname and hosts file."""
        return ["nsenter", f"--net=/run/netns/{self.ns[node]}", "unshare", "--mount", "--uts", "sh", "-c",
                'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"',
                hostname or NAMES[node], str(self.dir / "hosts"), *argv]

    def on_node(self, node: int, argv: list[str], **popen) -> subprocess.Popen:
        popen.setdefault("env", self.env())
        return subprocess.Popen(self.node_argv(node, argv), **popen)

    def client(self, argv: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A SLURM or ssh client command from n1's network (the controller's address is only reachable there)."""
        kw.setdefault("env", self.env())
        r = _run(["nsenter", f"--net=/run/netns/{self.ns[0]}", *argv], timeout, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}")
        return r

    # ---- set-up ------------------------------------------------------------------------------------------
    def up(self) -> "Cluster":
        t0 = time.perf_counter()
        self._network()
        self._files()
        self._munge()
        self._daemon(0, ["slurmctld", "-D", "-f", str(self.conf)], hostname="ctl")   # SlurmctldHost=ctl
        for node in (0, 1):
            self._daemon(node, ["slurmd", "-D", "-f", str(self.conf), "-N", NAMES[node]])
            self._daemon(node, ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / f"sshd_{NAMES[node]}.conf")])
        self._wait_ready()
        self.setup_s = time.perf_counter() - t0
        return self

    def _network(self) -> None:
        for ns in self.ns:
            try:
                _must(["ip", "netns", "add", ns])
            except RuntimeError as e:
                raise NoNamespaces(f"cannot make network namespaces here: {e}") from None
            self.made_ns.append(ns)
        # both ends made inside n1 (nothing touches the machine's own network), one moved to n2 and renamed there
        a, b = self.ns
        _must(["ip", "-n", a, "link", "add", IFACE, "type", "veth", "peer", "name", "mfcpeer"])
        _must(["ip", "-n", a, "link", "set", "mfcpeer", "netns", b])
        _must(["ip", "-n", b, "link", "set", "mfcpeer", "name", IFACE])
        for ns, addr in zip(self.ns, self.addr):
            _must(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE])
            _must(["ip", "-n", ns, "link", "set", IFACE, "up"])
            _must(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _files(self) -> None:
        d = self.dir
        (d / "hosts").write_text(f"127.0.0.1 localhost\n{self.addr[0]} n1 ctl\n{self.addr[1]} n2\n")
        for sub in ("ctld", "n1", "n2", "ssh", "bin"):
            (d / sub).mkdir()
        self.conf.write_text(_slurm_conf(d, self.addr))
        ssh = d / "ssh"
        _must(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id")])
        _must(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key")])
        shutil.copy(ssh / "id.pub", ssh / "authorized_keys")
        host_pub = (ssh / "host_key.pub").read_text().split()[:2]
        (ssh / "known_hosts").write_text("".join(f"{n},{a} {' '.join(host_pub)}\n" for n, a in zip(NAMES, self.addr)))
        for name, addr in zip(NAMES, self.addr):
            (d / f"sshd_{name}.conf").write_text(_sshd_conf(ssh, name, addr))
        (ssh / "config").write_text(_ssh_conf(ssh, self.addr))
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {ssh / "config"} "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)     # sshd's privilege separation directory

    def _munge(self) -> None:
        m = self.dir / "munge"
        m.mkdir(mode=0o755)              # munged refuses a socket directory other users cannot reach
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        shutil.chown(m, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        argv = ["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={m}/munge.socket",
                f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed"]
        self._daemon(0, argv, plain=True)
        self._until(lambda: (m / "munge.socket").exists(), 10, "munged's socket")

    def _daemon(self, node: int, argv: list[str], hostname: str | None = None, plain: bool = False) -> None:
        full = ["nsenter", f"--net=/run/netns/{self.ns[node]}", *argv] if plain else \
            self.node_argv(node, argv, hostname)
        name = Path(argv[0] if argv[0] != "runuser" else "munged").name
        log = open(self.dir / f"{name}.{hostname or NAMES[node]}.out", "w")
        self.daemons.append(subprocess.Popen(full, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))
        log.close()

    def _wait_ready(self) -> None:
        def nodes_idle() -> bool:
            r = self.client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in NAMES)

        def ssh_ok() -> bool:
            return all(self.client(["ssh", n, "true"], check=False, timeout=10).returncode == 0 for n in NAMES)

        self._until(nodes_idle, 60, "both slurmd idle in sinfo")
        self._until(ssh_ok, 30, "ssh to both nodes")

    def _until(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ok():
            dead = [p.args for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > end:
                logs = "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.dir.glob("*.out")))
                raise RuntimeError(f"cluster not up: waiting for {what}; exited: {dead}\n{logs}")
            time.sleep(0.2)

    # ---- teardown ----------------------------------------------------------------------------------------
    def down(self) -> None:
        """Kill every process inside our namespaces (daemons, jobs, ranks), delete the namespaces and files."""
        for ns in self.made_ns:
            pids = _run(["ip", "netns", "pids", ns]).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.daemons:
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in reversed(self.made_ns):    # deleting n1 deletes the veth pair with it
            _run(["ip", "netns", "del", ns])
        self.made_ns.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()

    def netns_of(self, pid: int) -> str | None:
        """Which of our nodes process `pid` runs in (by network namespace), or None."""
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        for name, ns in zip(NAMES, self.ns):
            if os.stat(f"/run/netns/{ns}").st_ino == ino:
                return name
        return None


def _slurm_conf(d: Path, addr: tuple[str, str]) -> str:
    cpus = os.cpu_count() or 1
    return f"""ClusterName=mfc
SlurmctldHost=ctl({addr[0]})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/ctld
SlurmctldPidFile={d}/ctld/slurmctld.pid
SlurmctldLogFile={d}/ctld/slurmctld.log
SlurmdSpoolDir={d}/%n/spool
SlurmdPidFile={d}/%n/slurmd.pid
SlurmdLogFile={d}/%n/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=n1 NodeAddr={addr[0]} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeAddr={addr[1]} CPUs={cpus} State=UNKNOWN
PartitionName=mfc Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def _sshd_conf(ssh: Path, name: str, addr: str) -> str:
    return f"""ListenAddress {addr}
HostKey {ssh}/host_key
PidFile {ssh}/sshd_{name}.pid
AuthorizedKeysFile {ssh}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


def _ssh_conf(ssh: Path, addr: tuple[str, str]) -> str:
    hosts = "".join(f"Host {n}\n  HostName {a}\n" for n, a in zip(NAMES, addr))
    return hosts + f"""Host *
  User root
  IdentityFile {ssh}/id
  IdentitiesOnly yes
  UserKnownHostsFile {ssh}/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
"""
