"""Run under `deepspeed --num_gpus 2`: FRM with ep_size=2 must equal the ep_size=1 model, then train 10 steps.

Writes OUT/rank<R>.json with the max output difference and the loss curve; tests/test_model_dist.py reads it.
"""
import argparse
import json
from pathlib import Path

import torch

from mfrnet_ds import build_model, load_config
from mfrnet_ds.engine import ckpt
from mfrnet_ds.engine import dist as D
from mfrnet_ds.engine.step import FiniteGuard, StepSettings, train_step
from mfrnet_ds.engine.build import build_engine

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int, default=-1)
args = p.parse_args()

info = D.init_distributed(args.local_rank)
common = ["model.img_size=[64,32]", "model.num_classes=4", "optim.backbone_lr=3.5e-4", "data.num_instances=2",
          "train.global_batch=16", "model.frm.gate_noise=none", "model.ffm.gate_noise=none"]
ref = build_model(load_config(None, common))                     # ep_size 1: all six experts here
cfg = load_config(None, common + ["model.frm.ep_size=2"])
model = D.place_experts(build_model(cfg), cfg.train.seed, info.rank)
ref_sd = ref.state_dict()
init_equal = all(torch.equal(v, ref_sd_v) for v, ref_sd_v in
                 zip(model.state_dict().values(), ckpt.shard_state_dict(ref_sd, model, info.rank).values()))
model.load_state_dict(ckpt.shard_state_dict(ref_sd, model, info.rank))

engine = build_engine(model, cfg, info, D.deepspeed_config(cfg, info.world_size), total_steps=100)

g = torch.Generator().manual_seed(100 + info.rank)               # each rank its own input
images = torch.randn(8, 3, 3, 64, 32, generator=g)
camids = torch.randint(0, 4, (8,), generator=g)
labels = torch.arange(4).repeat_interleave(2)
engine.eval(); ref.eval()
with torch.no_grad():
    got = engine(images, camids).embedding
    want = ref(images, camids).embedding
    got_missing = engine(images, camids, missing="n").embedding
    want_missing = ref(images, camids, missing="n").embedding
diff = max((got - want).abs().max().item(), (got_missing - want_missing).abs().max().item())

engine.train()
losses = []
how = StepSettings(micro=8, accum=1, device=info.device, dtype=D.engine_dtype(engine), loss=cfg.loss)
guard = FiniteGuard(info.device)
for step in range(10):
    parts = train_step(engine, {"images": images, "camids": camids, "labels": labels}, how, step + 1, guard)
    losses.append(parts["loss"].item())
guard.check()
local = [n for n, _ in engine.module.named_parameters() if ".deepspeed_experts." in n and n.startswith("vit.")]
Path(args.out).mkdir(parents=True, exist_ok=True)
Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(
    {"world": info.world_size, "init_equal": init_equal, "max_diff": diff, "losses": losses,
     "local_frm_expert_params": len(local)}))
