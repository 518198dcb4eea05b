"""`deepspeed ARGS...` with an honest exit status; what launch/node.sh, multinode_ssh.sh and slurm.sbatch run.

    python3 launch/ds_run.py DEEPSPEED_COMMAND [deepspeed arguments ...]
    python3 launch/ds_run.py deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml

DeepSpeed's runner (the `deepspeed` command, deepspeed/launcher/runner.py) starts one child, the launcher
(`python -m deepspeed.launcher.launch` on this node, or pdsh/mpirun/srun for several), waits for it and exits
with the child's status only when that is > 0. A launcher killed by a signal (SIGKILL, the OOM killer) has a
negative status, and the runner then exits 0: a scheduler records a failed run as a success. The runner also
leaves SIGTERM/SIGINT to their default on a single node (no pdsh): killing the runner alone ends it at once
and leaves the launcher and the ranks running without it.

This runs the same runner, in this process, and
  - passes SIGTERM and SIGINT on to the launcher (whose handler stops the ranks: SIGTERM to every rank
    process, SIGKILL 30 s later), then waits for it: the ranks stop at a step boundary and save;
  - exits with the runner's own non-zero status, or 128 + N when the launcher was killed by signal N, or
    128 + N when this process got signal N (SIGTERM: 143) and the run did not end cleanly, else 0;
  - is the "child subreaper" of the processes under it (Linux): when the launcher dies by a signal its ranks
    are left running, unsupervised, and become this process's children; they get SIGTERM (they save at their
    next step boundary) and SIGKILL 30 s later, as the launcher would have done, before this exits.

DEEPSPEED_COMMAND is the `deepspeed` script to run (a name on PATH or a path); its interpreter (the `#!` line)
runs the runner, as it would have, so any python3 can start this file.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys

_REEXEC = "MFRNET_DS_RUN_INTERPRETER"   # set while re-executing under the deepspeed script's interpreter


def _interpreter(script: str) -> list[str] | None:
    """The `#!` command line of `script` when it is a Python script (pip writes one for `deepspeed`)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        return shlex.split(first[2:])
    return None


def _become_subreaper() -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans below this process are reparented to it, not to init."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0   # 36: PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _stop_orphans(grace_s: float = 30.0) -> int:
    """SIGTERM the processes left below this one (the ranks of a launcher that died), SIGKILL after grace_s."""
    import psutil
    orphans = psutil.Process().children(recursive=True)
    if not orphans:
        return 0
    for p in orphans:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(orphans, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(orphans)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = shutil.which(argv[0])
    if command is None:
        print(f"launch/ds_run.py: {argv[0]}: not found (activate the project's .venv or set DEEPSPEED)",
              file=sys.stderr)
        return 2
    interpreter = _interpreter(command)
    if interpreter and not os.environ.pop(_REEXEC, None):
        os.environ[_REEXEC] = "1"
        try:
            os.execvp(interpreter[0], [*interpreter, os.path.abspath(__file__), *argv])
        except OSError as e:
            print(f"launch/ds_run.py: cannot run {command}'s interpreter {interpreter[0]}: {e}", file=sys.stderr)
            return 2
    try:
        from deepspeed.launcher import runner
    except ImportError as e:
        print(f"launch/ds_run.py: {sys.executable} cannot import DeepSpeed ({e}); run it with the project's python",
              file=sys.stderr)
        return 2

    children: list[subprocess.Popen] = []
    received: list[int] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # the launcher: Popen(cmd, env=env) with our stdout/stderr (the runner's ssh and hostname probes
            # capture or discard theirs)
            if "env" in kwargs and "stdout" not in kwargs and "stderr" not in kwargs:
                children.append(self)

    def forward(signum, frame):
        received.append(signum)
        if not children:                       # nothing started yet: start nothing
            raise SystemExit(128 + signum)
        if children[0].returncode is None:
            try:
                os.kill(children[0].pid, signum)   # the launcher's handler stops the ranks, then it exits
            except ProcessLookupError:
                pass

    subreaper = _become_subreaper()
    subprocess.Popen = Recorded             # the runner calls subprocess.Popen(cmd, env=env)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)           # the runner replaces these with its own for pdsh
    try:
        runner.main(argv[1:])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    launcher = children[0] if children else None
    status = launcher.poll() if launcher else None
    killed = status is not None and status < 0
    if killed:
        print(f"launch/ds_run.py: the DeepSpeed launcher (pid {launcher.pid}) was killed by "
              f"{signal.Signals(-status).name}", file=sys.stderr, flush=True)
        if subreaper and (stopped := _stop_orphans()):
            print(f"launch/ds_run.py: stopped the {stopped} processes it left running (SIGTERM, SIGKILL after "
                  f"30 s)", file=sys.stderr, flush=True)
    if received and not (code == 0 and status == 0):
        return 128 + received[0]
    if code:
        return code
    return 128 - status if killed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
