"""Build DeepSpeed's CPU communication op (deepspeed_shm_comm) once, before any rank starts.

    python launch/build_ops.py

Every rank loads this op from TORCH_EXTENSIONS_DIR as it joins the process group, and JIT-compiles it first when
it is not there (about a minute on 2 cores). That time counts against the start-up rendezvous
(train.collective_timeout_s): a node still compiling fails the others with "1/2 clients joined". The launch
scripts run this on the first node first, so the ranks find the build done; the directory (and the `ninja` on
PATH that built it) must then be the same for every node: a shared filesystem, passed on by the scripts.
Nothing to build on GPUs (the op is CPU-only): exits 0 at once. Exit 1 with the build's error otherwise.
When TORCH_EXTENSIONS_DIR holds a build that ninja calls up to date, this returns without importing torch
(importing torch and DeepSpeed alone takes 5-10 s on a busy node, on every launch).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

OP = "deepspeed_shm_comm"


def _up_to_date() -> bool:
    """The op's build directory exists and ninja (the one on PATH, which torch runs too) has nothing to do."""
    root, ninja = os.environ.get("TORCH_EXTENSIONS_DIR"), shutil.which("ninja")
    build = os.path.join(root or "", OP)
    if not (root and ninja and os.path.isfile(os.path.join(build, f"{OP}.so"))
            and os.path.isfile(os.path.join(build, "build.ninja"))):
        return False
    r = subprocess.run([ninja, "-C", build, "-n"], capture_output=True, text=True)
    return r.returncode == 0 and "no work to do" in r.stdout


def main() -> int:
    t0 = time.perf_counter()
    if _up_to_date():
        print(f"launch/build_ops.py: DeepSpeed CPU op ready in {os.environ['TORCH_EXTENSIONS_DIR']} (up to date)",
              flush=True)
        return 0
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.comm.torch import build_shm_op
        if get_accelerator().device_name() != "cpu":
            return 0
        op = build_shm_op()
    except Exception as e:          # the compiler's output is above; say what failed in one line
        print(f"launch/build_ops.py: error: building DeepSpeed's CPU op failed: {e}", file=sys.stderr)
        return 1
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    print(f"launch/build_ops.py: DeepSpeed CPU op {'ready' if op else 'not needed'} in {where} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
