"""Smoke test of bench/train_step.py: both loops run and the table has both rows (in a subprocess, since the
bench initialises torch.distributed for its DeepSpeed engine)."""
import subprocess
import sys

from launcher import ROOT


def test_train_step_bench_prints_both_loops():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/train_step.py"), "--img", "64", "32", "--batch", "8",
                           "--steps", "1", "--warmup", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith(("plain-torch", "deepspeed"))}
    assert set(rows) == {"plain-torch", "deepspeed"}
    for r in rows.values():
        assert float(r[1]) > 0 and float(r[2]) > 0      # ms/step, samples/s
