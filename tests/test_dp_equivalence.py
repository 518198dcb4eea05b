"""Scaling out must not change what is learned: the real trainer under the real `deepspeed` launcher on 1, 2 and
4 CPU processes (gloo), same shards, same seed, same global P x K batches, compared numerically.

Randomness that legitimately depends on the rank is switched off (expert dropout, gate noise, token dropping:
each rank would draw its own), and so is the MoE aux loss (aux_weight 0): DeepSpeed computes it per rank from
local routing statistics, so it differs with the world size (docs/MULTINODE.md explains why); its unweighted
value is still logged per layer (balance/<layer>, averaged over ranks) and printed here. Augmentation stays ON: each sample's draw is
seeded by its position in the global batch, so it is the same whichever rank decodes it.
"""
import json

import pytest
import torch

from launcher import ROOT, read_train_log, run_deepspeed, tiny_shards

TRAIN = ROOT / "launch/train.py"
SAME_MATHS = ["model.img_size=[64,32]", "train.global_batch=16", "data.num_instances=4", "data.num_workers=1",
              "tracking.enabled=false", "train.eval_first=false", "train.eval_missing=false", "train.eval_every=100",
              "train.log_every=1", "train.max_steps=3", "train.seed=3",
              "model.frm.dropout=0", "model.ffm.dropout=0", "model.frm.gate_noise=none", "model.ffm.gate_noise=none",
              "model.frm.drop_tokens=false", "model.ffm.drop_tokens=false",
              "model.frm.aux_weight=0", "model.ffm.aux_weight=0",
              # Adam's update ignores the scale of a gradient (m / sqrt(v)): with eps far above |g| it becomes
              # lr x g, so a gradient off by a constant factor (e.g. the world size) shows in the weights
              "optim.eps=1.0", "optim.lr=0.05", "optim.backbone_lr=0.05"]
# "zero2_fp32" is written by the fixture.
# name -> (processes, FRM ep_size, DeepSpeed JSON, gradient accumulation); each run is compared with the one-process
# run of the same accumulation (accumulating changes the loss itself: mining over each micro step's 8 samples)
RUNS = {"1 process": (1, 1, "ds_configs/fp32.json", 1),
        "2 ranks, ep 1, ZeRO-0": (2, 1, "ds_configs/fp32.json", 1),
        "2 ranks, ep 2, ZeRO-2": (2, 2, "zero2_fp32", 1),
        "4 ranks (1 identity each), ep 2, ZeRO-1": (4, 2, "ds_configs/cpu.json", 1),
        "1 process, accumulation 2": (1, 1, "ds_configs/fp32.json", 2),
        "2 ranks, accumulation 2 (1 identity each per micro step), ep 2, ZeRO-1": (2, 2, "ds_configs/cpu.json", 2)}


def _reference(name: str) -> str:
    return "1 process, accumulation 2" if RUNS[name][3] == 2 else "1 process"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = tiny_shards(tmp_path_factory)
    base = tmp_path_factory.mktemp("dp")
    zero2 = base / "zero2_fp32.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2, "contiguous_gradients": True},
                                 "bf16": {"enabled": False}}))
    from mfrnet_ds.export import export
    out = {}
    for i, (name, (nprocs, ep, ds, accum)) in enumerate(RUNS.items()):
        run_dir = base / f"run{i}"
        ds_path = zero2 if ds == "zero2_fp32" else ROOT / ds
        run_deepspeed(TRAIN, ["--config", str(ROOT / "configs/demo.yaml"), "--deepspeed_config", str(ds_path),
                              f"data.shards={shards}", f"train.out_dir={run_dir}", f"model.frm.ep_size={ep}",
                              f"train.grad_accum={accum}", *SAME_MATHS], nprocs=nprocs, timeout=600)
        model_file = export(run_dir, base / f"model{i}.pt")
        blob = torch.load(model_file, weights_only=False)
        out[name] = {"log": read_train_log(run_dir), "params": blob["state_dict"], "config": blob["config"]}
    return out


@pytest.mark.slow
def test_losses_and_parameters_do_not_depend_on_the_number_of_ranks(runs):
    from mfrnet_ds import build_model
    from mfrnet_ds.config import config_from_saved

    for ref_name in ("1 process", "1 process, accumulation 2"):
        assert [r["step"] for r in runs[ref_name]["log"]] == [1, 2, 3]
    print("\nper-step losses (id, triplet) and the unweighted balance loss of frm.3 (mean of per-rank values):")
    for name, run in runs.items():
        print(f"  {name:<42}" + "  ".join(f"step {r['step']}: id {r['loss_id']:.6f} tri {r['loss_tri']:.6f} "
                                           f"balance {r['balance/frm.3']:.4f}" for r in run["log"]))
    for name, run in runs.items():
        ref = runs[_reference(name)]
        for got, want in zip(run["log"], ref["log"]):
            for key in ("loss_id", "loss_tri"):
                assert got[key] == pytest.approx(want[key], rel=1e-4), (name, got["step"], key)
    # The weights after 3 steps, to rtol 1e-4 (atol 1e-6 for weights near 0). And what the steps changed, to 1% of
    # each tensor's largest change: a gradient scaled by a constant (say the world size) fails this one.
    init = build_model(config_from_saved(runs["1 process"]["config"])).state_dict()
    for name, run in runs.items():
        ref = runs[_reference(name)]
        change = {k: v - init[k] for k, v in ref["params"].items() if v.is_floating_point()}
        assert max(d.abs().max() for d in change.values()) > 1e-3, "the steps really moved the weights"
        assert run["params"].keys() == ref["params"].keys()
        for key, delta in change.items():
            got, want = run["params"][key], ref["params"][key]
            worst = (got - want).abs().max().item()
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (name, key, worst)
            assert worst <= 0.01 * delta.abs().max() + 1e-8, (name, key, worst, delta.abs().max().item())
    # accumulating really changed the loss (mining over 8 instead of 16 samples), else the second group proves little
    assert runs["1 process, accumulation 2"]["log"][0]["loss_tri"] != \
        pytest.approx(runs["1 process"]["log"][0]["loss_tri"], rel=1e-3)


@pytest.mark.slow
def test_one_identity_per_rank_still_has_a_triplet_loss(runs):
    """4 ranks x 4 samples with K = 4: each rank holds ONE identity. Mining over one rank's slice would find no
    negative (loss 0); over the gathered global micro batch it is the single-process loss."""
    one = runs["4 ranks (1 identity each), ep 2, ZeRO-1"]["log"]
    ref = runs["1 process"]["log"]
    for got, want in zip(one, ref):
        assert got["loss_tri"] > 0.1
        assert got["loss_tri"] == pytest.approx(want["loss_tri"], rel=1e-4)
