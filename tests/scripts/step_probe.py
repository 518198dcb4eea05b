"""Run the trainer's real step (engine/step.py) in one process and report, as JSON on stdout, what tests/test_step.py
checks: which host reads each micro step made, and what a non-finite loss does under train.on_nan.

    python tests/scripts/step_probe.py syncs [overrides...]
    python tests/scripts/step_probe.py nan-stop | nan-skip
"""
import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch

from mfrnet_ds import build_model, load_config
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.build import build_engine
from mfrnet_ds.engine.step import FiniteGuard, NonFiniteLoss, StepSettings, device_images, train_step

# What reads a tensor's value back to the host (on a GPU: a device sync when the tensor lives there).
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
ROOT = Path(__file__).resolve().parents[2]
MICRO, ACCUM = 8, 2


class HostReads:
    """While active, every READS call on a tensor, counted by the file:function that made it."""

    def __init__(self):
        self.calls = Counter()
        self._saved = {}

    def __enter__(self):
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *a, _name=name, _original=original, **k):
                frame = traceback.extract_stack(limit=2)[0]
                where = frame.filename
                for marker in ("site-packages/", str(ROOT) + "/"):
                    where = where.split(marker)[-1]
                self.calls[f"{where}:{frame.name}:{_name}"] += 1
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def build(overrides, ds_extra=None):
    info = D.init_distributed()
    cfg = load_config(ROOT / "configs/demo.yaml", ["model.img_size=[64,32]", "model.num_classes=4",
                                                   "model.frm.ep_size=1", "data.num_instances=4",
                                                   f"train.global_batch={MICRO * ACCUM}", *overrides])
    model = build_model(cfg)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
          "train_batch_size": MICRO * ACCUM, "zero_optimization": {"stage": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, **(ds_extra or {})}
    engine = build_engine(model, cfg, info, ds, total_steps=100)
    how = StepSettings(MICRO, ACCUM, info.device, D.engine_dtype(engine), cfg.loss, cfg.train.on_nan)
    return engine, how, FiniteGuard(info.device)


def batch(seed=0, uint8=True):
    g = torch.Generator().manual_seed(seed)
    n = MICRO * ACCUM
    images = torch.randint(0, 256, (n, 3, 3, 64, 32), generator=g, dtype=torch.uint8)
    return {"images": images if uint8 else images.float() / 127.5 - 1, "labels": torch.arange(n) // 4 % 4,
            "camids": torch.randint(0, 3, (n,), generator=g)}


def syncs(overrides):
    """Host reads per micro step: the first (no optimizer step) and the last (DeepSpeed steps the optimizer)."""
    engine, how, guard = build(overrides)
    train_step(engine, batch(0), how, 1, guard)          # warm-up: lazily built state
    per_micro = []
    real_step = engine.step

    def step_and_cut():
        real_step()
        per_micro.append(dict(reads.calls))
        reads.calls.clear()
    engine.step = step_and_cut
    with HostReads() as reads:
        train_step(engine, batch(1), how, 2, guard)
    engine.step = real_step
    with HostReads() as reads_at_check:
        guard.check()
    # uint8 images normalised on the device: exactly the float32 the loader's augmentation makes on the host
    u8 = batch(2)["images"]
    host = torch.empty(u8.shape)
    torch.mul(u8, 1 / 127.5, out=host).sub_(1.0)
    on_device = device_images(u8, how.device, torch.float32)
    return {"micro_steps": per_micro, "check": dict(reads_at_check.calls),
            "uint8_equal": torch.equal(on_device.cpu(), host)}


def nan(mode):
    engine, how, guard = build([f"train.on_nan={mode}"])
    train_step(engine, batch(0), how, 1, guard)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    bad = batch(1, uint8=False)
    bad["images"][3] = float("nan")
    out = {"raised": None}
    train_step(engine, bad, how, 2, guard)
    changed = [n for n, p in engine.module.named_parameters() if not torch.equal(before[n], p.detach())]
    out["params_changed_by_bad_step"] = len(changed)
    try:
        guard.check()
    except NonFiniteLoss as e:
        out["raised"] = str(e)
    train_step(engine, batch(2), how, 3, guard)
    out["finite_after"] = all(torch.isfinite(p).all().item() for p in engine.module.parameters())
    return out


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    result = syncs(rest) if what == "syncs" else nan(what.split("-")[1])
    print("RESULT " + json.dumps(result))
