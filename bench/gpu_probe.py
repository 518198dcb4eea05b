"""The small GPU measurements bench/gpu_check.sh prints (one subcommand each; every one runs in seconds).

    python bench/gpu_probe.py ceiling         # bf16 GEMM TFLOP/s of this device (8192^3, CUDA events)
    python bench/gpu_probe.py sdpa            # which SDPA kernel the ViT's attention runs at paper shapes
    python bench/gpu_probe.py syncs           # host syncs per micro step of the trainer's step, base preset, bf16
    python bench/gpu_probe.py embed           # embedding 10k triplets + scoring 10k x 10k
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cuda_ms(fn, iters: int, warmup: int = 3) -> float:
    """Mean milliseconds per call of `fn`, timed with CUDA events around `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def ceiling(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ b, iters=20)
    tflops = 2 * n ** 3 / (ms / 1e3) / 1e12
    print(f"bf16 GEMM ceiling: {tflops:.0f} TFLOP/s ({n}^3, mean of 20 after 3 warm-up)")
    print(f"CEILING_TFLOPS={tflops:.1f}")
    return tflops


def sdpa() -> None:
    """Run the attention of one base-preset block at paper shapes under each backend alone: the first that runs
    is the one torch's dispatcher picks (it tries them in this order), and the profile names its kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    q = torch.randn(64 * 3, 12, 129, 64, device="cuda", dtype=torch.bfloat16)
    usable = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
            usable.append(backend.name)
        except RuntimeError:
            pass
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    print(f"SDPA at (192, 12 heads, 129 tokens, 64) bf16: usable backends {usable}; default ran "
          f"{[k[:60] for k in kernels if 'attn' in k.lower() or 'fmha' in k.lower() or 'flash' in k.lower()] or kernels[:3]}")


def syncs() -> None:
    """Count CUDA host syncs per micro step of engine/step.py's train_step (torch.cuda.set_sync_debug_mode)."""
    from mfrnet_ds import build_model, load_config
    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.engine.build import build_engine
    from mfrnet_ds.engine.step import FiniteGuard, StepSettings, train_step
    info = D.init_distributed()
    micro, accum = 32, 2
    cfg = load_config(None, ["model.preset=base", "model.num_classes=171", "model.frm.ep_size=1",
                             f"train.global_batch={micro * accum}", "data.num_instances=4"])
    model = build_model(cfg).to(info.device)
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
          "train_batch_size": micro * accum, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine = build_engine(model, cfg, info, ds, total_steps=100)
    how = StepSettings(micro, accum, info.device, D.engine_dtype(engine), cfg.loss)
    guard = FiniteGuard(info.device)
    n = micro * accum
    batch = {"images": torch.randint(0, 256, (n, 3, 3, 256, 128), dtype=torch.uint8).pin_memory(),
             "labels": (torch.arange(n) // 4 % 171).pin_memory(), "camids": torch.zeros(n, dtype=torch.long).pin_memory()}
    train_step(engine, batch, how, 1, guard)
    counts = []
    real_step = engine.step

    def counted_step():
        real_step()
        counts.append(len(caught) - sum(counts))
    engine.step = counted_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        train_step(engine, batch, how, 2, guard)
        torch.cuda.set_sync_debug_mode(0)
    where = sorted({str(w.message).splitlines()[0][:100] for w in caught})
    print(f"host syncs per micro step (base, bf16, ZeRO-2, accum {accum}): {counts} "
          f"(first: no optimizer step; last: DeepSpeed's optimizer step); target 0 in a micro step")
    for w in where[:8]:
        print(f"  sync: {w}")


def embed(n: int = 10_000) -> None:
    from mfrnet_ds import build_model, load_config
    from mfrnet_ds.eval.metrics import evaluate_rank
    cfg = load_config(None, ["model.preset=base", "model.num_classes=171"])
    model = build_model(cfg).cuda().eval().to(torch.bfloat16)
    batch = 256
    images = torch.randn(batch, 3, 3, 256, 128, device="cuda", dtype=torch.bfloat16)
    camids = torch.zeros(batch, dtype=torch.long, device="cuda")
    with torch.no_grad():
        ms = cuda_ms(lambda: model(images, camids).embedding, iters=5, warmup=2)
    print(f"embedding: {ms * n / batch / 1e3:.1f} s for {n} triplets ({batch / ms * 1e3:.0f} triplets/s, bf16)")
    feats = torch.nn.functional.normalize(torch.randn(2 * n, 768, device="cuda"), dim=1)
    ids = torch.randint(0, 500, (2 * n,))
    cams = torch.randint(0, 4, (2 * n,))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dist = 1 - feats[:n] @ feats[n:].t()
    evaluate_rank(dist.float().cpu().numpy(), ids[:n].numpy(), ids[n:].numpy(), cams[:n].numpy(), cams[n:].numpy())
    print(f"scoring {n} x {n} (distance on the GPU, ranking on the host): {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("ceiling", "sdpa", "syncs", "embed"))
    {"ceiling": ceiling, "sdpa": sdpa, "syncs": syncs, "embed": embed}[ap.parse_args().what]()
