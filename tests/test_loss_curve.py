"""The first 20 training steps of a fixed tiny run reproduce the stored loss curve, tests/fixtures/loss_curve_tiny.json
(not under tests/data/: the .gitignore rule data/ would hide it).

One process, fp32 (ds_configs/cpu.json), the demo recipe at 64x32 on the synthetic shards of launcher.tiny_shards,
one torch thread and no loader workers, run through launch/train.py as a user would. Any change to the model, the
losses, the optimiser, the schedule, the sampler, the augmentation or the data pipeline that moves these numbers
fails here: if the move is intended, regenerate the file deliberately and say why in the commit:

    MFRNET_UPDATE_CURVE=1 python -m pytest -q tests/test_loss_curve.py

The numbers depend on the floating-point kernels of the machine (CPU instruction set, torch version); the file
records the versions it was written with, so a failure on other hardware or torch can be told apart.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from launcher import ROOT, read_train_log, tiny_shards, tiny_train_args

CURVE = ROOT / "tests/fixtures/loss_curve_tiny.json"
STEPS = 20
KEYS = ("loss", "loss_id", "loss_tri", "loss_aux", "lr")
RUN = ["model.frm.ep_size=1", "data.num_workers=0", f"train.max_steps={STEPS}", "train.eval_on_stop=false",
       "train.seed=0"]


def train_curve(shards, out_dir) -> list[dict]:
    # one thread: a parallel reduction may sum in another order, and a route that flips amplifies the change
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch/train.py"), *tiny_train_args(shards, out_dir, *RUN)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr\n{proc.stderr[-6000:]}"
    return [{k: row[k] for k in ("step", *KEYS)} for row in read_train_log(out_dir)]


def write_curve(steps: list[dict]) -> None:
    # one line per step, so a deliberate update reads as a per-step diff
    head = {"written_with": {"torch": torch.__version__, "machine": platform.machine()}, "run": RUN}
    lines = ",\n".join(f"  {json.dumps(row)}" for row in steps)
    CURVE.write_text(json.dumps(head)[:-1] + f', "steps": [\n{lines}\n]}}\n')


def test_first_steps_reproduce_the_stored_curve(tmp_path_factory, tmp_path):
    got = train_curve(tiny_shards(tmp_path_factory), tmp_path / "run")
    assert [row["step"] for row in got] == list(range(1, STEPS + 1)), "train.log_every=1 logs every step"
    if os.environ.get("MFRNET_UPDATE_CURVE") == "1":
        write_curve(got)
        pytest.skip(f"rewrote {CURVE.relative_to(ROOT)}: review the change and commit it")
    stored = json.loads(CURVE.read_text())
    assert stored["run"] == RUN, "the run's settings changed: regenerate the curve (see the module docstring)"
    want = stored["steps"]
    assert [row["step"] for row in want] == [row["step"] for row in got]
    for mine, theirs in zip(got, want):
        for key in KEYS:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-8), \
                (f"step {mine['step']} {key}: {mine[key]} vs stored {theirs[key]} (written with "
                 f"{stored['written_with']}); if intended, regenerate: see the module docstring")
