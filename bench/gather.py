"""Benchmark: what mining and BNNeck over the global micro batch cost, against per-rank losses, in the same run.

    deepspeed --num_gpus 2 bench/gather.py                       # CPU (gloo): tiny preset, fp32
    deepspeed --num_gpus 8 bench/gather.py --preset base --img 256 128 --micro 8 --dtype bf16   # GPU

Both steps run the same DeepSpeed engine on the same batch, alternating so machine noise hits both alike:
`global` is the trainer's step (features and labels all-gathered, BNNeck + losses on the whole global micro
batch, gradients all-reduced back through the gather); `per-rank` computes the same losses on the rank's own
slice only (what the trainer did before, and a different, weaker loss). The ratio is the price of training the
same model at any world size.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mfrnet_ds import build_model, load_config
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.step import step_losses
from mfrnet_ds.engine.loss import compute_losses
from mfrnet_ds.engine.build import build_engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--img", type=int, nargs=2, default=[128, 64])
    ap.add_argument("--micro", type=int, default=16, help="samples per rank per step")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    info = D.init_distributed(args.local_rank)
    world = info.world_size
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.img_size=[{args.img[0]},{args.img[1]}]",
                             "model.num_classes=171", f"data.num_instances={args.k}",
                             f"train.global_batch={args.micro * world}"])
    model = D.place_experts(build_model(cfg), cfg.train.seed, info.rank)
    ds_cfg = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
              "train_batch_size": args.micro * world, "zero_optimization": {"stage": 1},
              "bf16": {"enabled": args.dtype == "bf16"}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    engine = build_engine(model, cfg, info, ds_cfg, total_steps=10 ** 6)
    g = torch.Generator().manual_seed(info.rank)
    images = torch.randn(args.micro, 3, 3, *args.img, generator=g).to(info.device, D.engine_dtype(engine))
    camids = torch.randint(0, 4, (args.micro,), generator=g).to(info.device)
    labels = (torch.arange(args.micro) // args.k + info.rank * args.micro // args.k).to(info.device)

    def global_step():
        loss = step_losses(engine, images, camids, labels, cfg.loss)["loss"]
        engine.backward(loss)
        engine.step()

    def per_rank_step():
        out = engine(images, camids)
        loss = compute_losses(engine.module.classify(out.features), out.features, labels, out.aux_loss,
                              cfg.loss)["loss"]
        engine.backward(loss)
        engine.step()

    def timed(fn) -> float:
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        fn()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    steps = {"per-rank": per_rank_step, "global": global_step}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    if info.is_main:
        dev = torch.cuda.get_device_name() if info.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads/rank)"
        print(f"gather cost | {dev} | {world} ranks | preset {args.preset} | micro {args.micro} per rank "
              f"({args.micro * world} global) {args.img[0]}x{args.img[1]} | {args.dtype} | median of {args.steps}")
        base = statistics.median(times["per-rank"])
        print(f"{'step':<10}{'ms/step':>10}{'vs per-rank':>13}")
        for name, t in times.items():
            m = statistics.median(t)
            print(f"{name:<10}{m * 1e3:>10.1f}{m / base:>12.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
