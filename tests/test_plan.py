"""Capacity plan: the numbers that must hold, checked against the real model where it can run here."""
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mfrnet_ds import ConfigError, build_model, load_config
from mfrnet_ds.costs import FLOP_EXTRA, activation_bytes, meta_model, moe_facts
from mfrnet_ds.plan import format_plan, main, plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.img_size=[64,32]"]          # 4 x 2 patches + CLS = 9 tokens per image
ZERO = {s: {"zero_optimization": {"stage": s}, "bf16": {"enabled": True}} for s in (0, 1, 2)}


def cfg(*overrides):
    return load_config(None, [*SMALL, *overrides])


def frm_layer(p):
    return next(layer for layer in p["params"]["layers"] if layer["layer"].startswith("frm."))


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_experts_per_gpu_is_experts_over_ep_size(ep):
    p = plan(cfg("model.frm.num_experts=8", f"model.frm.ep_size={ep}"), 1, 8, ds_config=ZERO[2])
    layer = frm_layer(p)
    assert layer["experts_per_gpu"] == 8 // ep
    assert layer["expert_data_parallel"] == 8 // ep
    assert p["params"]["experts_per_gpu"] == sum(
        l_["experts_per_gpu"] * l_["params_per_expert"] for l_ in p["params"]["layers"])


def test_doubling_ep_size_halves_expert_params_per_gpu():
    frm_params = []
    for ep in (2, 4):
        p = plan(cfg("model.frm.num_experts=8", f"model.frm.ep_size={ep}", "model.ffm.enabled=false"),
                 1, 8, ds_config=ZERO[2])
        frm_params.append(p["params"]["experts_per_gpu"])
        dense, total = p["params"]["dense"], p["params"]["total_model"]
    assert frm_params[1] * 2 == frm_params[0]
    # what is replicated and what the whole model holds do not depend on the sharding
    p1 = plan(cfg("model.frm.num_experts=8", "model.frm.ep_size=1", "model.ffm.enabled=false"), 1, 8,
              ds_config=ZERO[2])
    assert (p1["params"]["dense"], p1["params"]["total_model"]) == (dense, total)


def test_zero2_optimizer_memory_shrinks_with_the_data_parallel_size():
    opt = {}
    for nodes in (1, 2, 4):
        c = cfg(f"train.global_batch={64 * nodes}")
        opt[nodes] = plan(c, nodes, 8, ds_config=ZERO[2])["memory_bytes"]["optimizer"]
    # ZeRO-0 keeps the whole fp32 master + Adam moments on every GPU whatever the world size
    for nodes in (1, 4):
        p0 = plan(cfg(f"train.global_batch={64 * nodes}"), nodes, 8, ds_config=ZERO[0])
        assert p0["memory_bytes"]["optimizer"] == pytest.approx(12 * p0["params"]["per_gpu"])
    assert opt[1] > opt[2] > opt[4]
    assert opt[1] == pytest.approx(2 * opt[2]) and opt[2] == pytest.approx(2 * opt[4])


def test_zero_stages_order_memory_and_partition_over_the_right_groups():
    c = cfg("model.frm.num_experts=8", "model.frm.ep_size=4")
    mem = {s: plan(c, 1, 8, ds_config=ZERO[s])["memory_bytes"] for s in (0, 1, 2)}
    assert mem[0]["optimizer"] > mem[1]["optimizer"] == mem[2]["optimizer"]
    assert mem[1]["grads"] > mem[2]["grads"]
    p = plan(c, 1, 8, ds_config=ZERO[1])
    dense, experts = p["params"]["dense"], p["params"]["experts_per_gpu"]
    frm = frm_layer(p)
    frm_params = frm["experts_per_gpu"] * frm["params_per_expert"]
    # dense states over all 8 GPUs, FRM experts over their expert-data-parallel group of 8 / 4 = 2
    expected = 12 * (dense / 8 + frm_params / 2 + (experts - frm_params) / 8)
    assert p["memory_bytes"]["optimizer"] == pytest.approx(expected)


def test_all_to_all_bytes_scale_with_capacity_factor_and_leave_the_node_only_across_nodes():
    base = ["model.frm.num_experts=8", "model.frm.ep_size=8", "train.global_batch=128"]
    a2a = {}
    for cf in (1.0, 2.0):
        p = plan(cfg(*base, f"model.frm.capacity_factor={cf}"), 1, 8, ds_config=ZERO[2])
        a2a[cf] = next(a for a in p["all_to_all"] if a["layer"].startswith("frm."))
    tokens = p["batch"]["tokens_per_micro"]                 # 16 samples x 3 images x 9 tokens = 432
    assert a2a[1.0]["capacity"] == tokens // 8
    assert a2a[1.0]["buffer_bytes"] == 8 * (tokens // 8) * 64 * 2   # experts x capacity x width x bf16
    assert a2a[2.0]["bytes_per_step"] == 2 * a2a[1.0]["bytes_per_step"] == 2 * 4 * a2a[1.0]["buffer_bytes"]
    assert a2a[1.0]["off_node_fraction"] == 0 and a2a[1.0]["intra_node_fraction"] == pytest.approx(7 / 8)
    # the same group of 8 spread over two nodes of 4: half of every all-to-all leaves the node
    spread = plan(cfg(*base), 2, 4, ds_config=ZERO[2])
    frm = next(a for a in spread["all_to_all"] if a["layer"].startswith("frm."))
    assert frm["off_node_fraction"] == pytest.approx(0.5) and frm["intra_node_fraction"] == pytest.approx(3 / 8)
    slow = plan(cfg(*base), 2, 4, ds_config=ZERO[2], link_gbps=200)
    assert slow["time_s"]["all_to_all"] == pytest.approx(2 * spread["time_s"]["all_to_all"])
    ep1 = plan(cfg("model.frm.num_experts=8"), 1, 8, ds_config=ZERO[2])
    assert all(a["bytes_per_step"] == 0 for a in ep1["all_to_all"])


def test_forward_flops_equal_a_count_on_the_real_model():
    c = cfg("model.num_classes=5", "model.frm.num_experts=8", "model.frm.router=linear",
            "model.frm.capacity_factor=1.5")
    p = plan(c, 1, 2, ds_config=ZERO[2])
    micro = p["batch"]["micro"]
    model = build_model(c).train()  # training routing: capacity factor, dropped tokens
    with FlopCounterMode(display=False, custom_mapping=FLOP_EXTRA) as counter, torch.no_grad():
        model(torch.zeros(micro, 3, 3, 64, 32), torch.zeros(micro, dtype=torch.long))
    # the forward ends at the head features; the classifier (3P x classes per sample, on the gathered global
    # micro batch) is left out of both
    assert p["flops"]["forward_per_micro"]["total"] == counter.get_total_flops()
    assert p["flops"]["step_per_gpu"] == 3 * p["flops"]["forward_per_micro"]["total"] * p["batch"]["grad_accum"]


@pytest.mark.parametrize("overrides, dtype", [
    ([], torch.float32),
    (["model.frm.router=linear", "model.frm.num_experts=8", "model.frm.top_k=2"], torch.float32),
    (["model.ffm.enabled=false"], torch.bfloat16),
])
def test_activation_estimate_matches_the_tensors_autograd_saves(overrides, dtype):
    c = load_config(None, ["model.num_classes=5", *overrides])   # 256 x 128: 129 tokens per image
    micro = 2
    est = activation_bytes(c, moe_facts(meta_model(c)), micro, 129, 2 if dtype == torch.bfloat16 else 4)
    model = build_model(c).train().to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(micro, 3, 3, 256, 128, dtype=dtype), torch.zeros(micro, dtype=torch.long))
    assert est["total"] == pytest.approx(sum(saved.values()), rel=0.05)


def test_invalid_combinations_fail_clearly():
    with pytest.raises(ConfigError, match=r"model.frm.ep_size=8 does not divide .* 3 x 2 = 6"):
        plan(cfg("model.frm.num_experts=8", "model.frm.ep_size=8", "train.global_batch=48"), 3, 2,
             ds_config=ZERO[2])
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        plan(cfg(), 1, 8, ds_config={"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="num_instances"):
        plan(cfg("train.grad_accum=8"), 1, 8, ds_config=ZERO[2])   # micro steps of 8 = one identity of K = 8
    plan(cfg(), 8, 8, ds_config=ZERO[2])   # 64 samples over 64 GPUs works: mining sees the gathered 8 x 8
    with pytest.raises(ConfigError, match="nodes=0"):
        plan(cfg(), 0, 8, ds_config=ZERO[2])


def test_command_line(capsys):
    ds = ROOT / "ds_configs" / "zero1.json"
    assert main([*SMALL, f"train.deepspeed_config={ds}", "model.frm.num_experts=8", "model.frm.ep_size=4",
                 "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gb", "40"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-1" in out and "frm.3" in out and "step time estimate" in out
    assert main([*SMALL, f"train.deepspeed_config={ds}", "--nodes", "1", "--gpus-per-node", "8",
                 "--zero-stage", "2"]) == 0
    assert "ZeRO-2" in capsys.readouterr().out
    assert main(["model.frm.ep_size=4", "--nodes", "1", "--gpus-per-node", "8"]) == 2
    assert "model.frm.ep_size=4" in capsys.readouterr().err


def test_zero2_overlap_hides_the_reduce_scatter_behind_backward():
    c = cfg("train.global_batch=128")
    exposed = {}
    for name, ds in (("zero1", ZERO[1]), ("zero2", {**ZERO[2], "zero_optimization": {"stage": 2}}),
                     ("zero2-overlap", {**ZERO[2], "zero_optimization": {"stage": 2, "overlap_comm": True}})):
        exposed[name] = plan(c, 2, 8, ds_config=ds, mfu=0.01)["time_s"]["grad_sync_exposed"]
    assert exposed["zero2"] > 0
    assert exposed["zero1"] == pytest.approx(exposed["zero2"])              # one micro step: same volume
    assert exposed["zero2-overlap"] == pytest.approx(exposed["zero2"] / 2)  # only the all-gather is left


def test_plan_derives_loader_workers_from_the_steps_demand():
    from mfrnet_ds.plan import loader_workers
    assert loader_workers(0.5, 300) == {"demand": 0.5, "rate": 300, "workers": 2}
    assert loader_workers(1500, 300)["workers"] == 6
    p = plan(load_config(ROOT / "configs/rgbnt201.yaml", ["model.pretrained=none"]), 1, 8, loader_rate=100.0)
    assert p["loader"]["demand"] == pytest.approx(p["samples_per_s"] / 8)
    assert p["loader"]["workers"] == math.ceil(p["loader"]["demand"] / 100.0) + 1
    assert "data.num_workers >= " in format_plan(p)


def test_paper_recipe_plans_without_its_weights_file(capsys):
    """configs/rgbnt201.yaml says model.pretrained=required (training stops until a file is given); a capacity
    plan reads no weights, so the documented command works as it is."""
    assert main(["--config", str(ROOT / "configs" / "rgbnt201.yaml"), "--nodes", "1", "--gpus-per-node", "8"]) == 0
    assert "capacity plan: preset base" in capsys.readouterr().out
