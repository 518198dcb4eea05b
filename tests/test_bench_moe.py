"""Smoke run of bench/moe.py at tiny shapes: every layer timed and measured, in one table."""
import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "moe.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_moe", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_all_six_layers_with_finite_numbers(capsys):
    bench = load_bench()
    rc = bench.main(["--quick", "--experts", "2,3", "--batch", "2", "--tokens", "5", "--dim", "16",
                     "--hidden", "8", "--warmup", "1", "--repeat", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc in (0, 1)                  # 1 = a target missed, which tiny shapes may well do
    rows = [line.split() for line in out.splitlines() if line[:7].strip().isdigit()]
    for experts in ("2", "3"):
        group = [r for r in rows if r[0] == experts]
        names = [" ".join(r[1:3]) for r in group]
        assert names == ["dense MLP", "MoE linear", "MoE cosine", "DS linear", "masked loop", "ViT MLP"], out
        for r in group:
            ms, ratio, best, mib, mem_ratio = (float(r[3]), float(r[5].rstrip("x")), float(r[6].rstrip("x")),
                                               float(r[7]), float(r[8].rstrip("x")))
            assert ms > 0 and all(math.isfinite(v) for v in (ms, ratio, best, mib, mem_ratio)), r
            assert mib > 0, r
        assert group[0][5] == group[0][6] == "1.00x"               # the dense MLP is the peer
        assert {r[-1] for r in group[1:3]} <= {"PASS", "MISS"}     # both MoEs judged against the targets
    assert "target (MoE linear <= 1.2x, MoE cosine <= 1.3x dense MLP on cpu fp32" in out and "on best times" in out
    assert "2 experts vs the ViT MLP an FRM block replaces (GPU target <= 1.0x): MoE linear " in out
