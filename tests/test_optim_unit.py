"""Optimiser groups and both lr schedules, against values worked out by hand from the formulas (engine/optim.py).

Fast unit tests on the real tiny model: no DeepSpeed engine, no processes.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from deepspeed.moe.utils import is_moe_param

from mfrnet_ds import build_model, load_config
from mfrnet_ds.config import OptimConfig
from mfrnet_ds.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups, reference_lr

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    # per-modality heads: the token reductions give the head role biases and norm gains
    cfg = load_config(None, ["model.img_size=[64,32]", "model.num_classes=5", "model.head=per_modality"])
    return build_model(cfg)


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def names_of(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def expected_role(name: str) -> str:
    if name.startswith("ffm.") or ".moe." in name:
        return "experts"
    return "backbone" if name.startswith("vit.") else "head"


def test_every_trainable_parameter_in_exactly_one_group(model):
    cfg = OptimConfig()
    groups = param_groups(model, cfg)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}


def test_head_scope_doubles_head_biases_only(model):
    cfg = OptimConfig(lr=1e-3, backbone_lr=2e-5, bias_lr_factor=3.0, weight_decay=5e-4, bias_lr_scope="head")
    groups = by_name(param_groups(model, cfg))
    assert list(groups) == ["backbone", "experts", "head", "head.bias", "ep_size_1"]
    assert [groups[n]["lr"] for n in groups] == [2e-5, 1e-3, 1e-3, 3e-3, 1e-3]
    # the backbone keeps its biases at backbone_lr; the head's norm gains (1-D, not "bias") stay at lr
    backbone = names_of(model, groups["backbone"]["params"])
    assert "vit.blocks.0.attn.qkv.bias" in backbone and "vit.norm_pre.weight" in backbone
    assert names_of(model, groups["head.bias"]["params"]) == {f"reductions.{i}.{m}.bias" for i in range(3)
                                                              for m in ("norm", "fc")}
    assert "reductions.0.norm.weight" in names_of(model, groups["head"]["params"])
    for name, group in groups.items():
        role = name.split(".")[0] if name != "ep_size_1" else "experts"
        assert {expected_role(n) for n in names_of(model, group["params"])} == {role}, name


def test_all_1d_scope_applies_the_factor_to_every_1d_parameter_of_every_role(model):
    cfg = OptimConfig(lr=1e-3, backbone_lr=2e-5, bias_lr_factor=2.0, bias_lr_scope="all_1d")
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["backbone", "backbone.bias", "experts", "experts.bias", "head",
                                           "head.bias", "ep_size_1", "ep_size_1"]
    for g in groups:
        one_d = {p.dim() == 1 for p in g["params"]}
        is_bias = g["name"].endswith(".bias") or (g.get("moe") and g["lr"] == 2e-3)
        assert one_d == {bool(is_bias)}, g["name"]
    lrs = {g["name"]: g["lr"] for g in groups if not g.get("moe")}
    assert lrs == {"backbone": 2e-5, "backbone.bias": 4e-5, "experts": 1e-3, "experts.bias": 2e-3,
                   "head": 1e-3, "head.bias": 2e-3}
    # the experts' 1-D and 2-D parameters keep their own lrs after the split into expert groups
    assert sorted(g["lr"] for g in groups if g.get("moe")) == [1e-3, 2e-3]


def test_weight_decay_on_every_group_1d_included_as_the_reference(model):
    cfg = OptimConfig(weight_decay=5e-4, bias_lr_scope="all_1d")
    optimizer = build_optimizer(param_groups(model, cfg), cfg, CPU)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {5e-4}
    assert any(p.dim() == 1 for g in optimizer.param_groups for p in g["params"])


def test_expert_parameters_split_into_their_own_groups(model):
    groups = param_groups(model, OptimConfig())
    for g in groups:
        assert all(is_moe_param(p) for p in g["params"]) == bool(g.get("moe")), g["name"]
    experts = [g for g in groups if g.get("moe")]
    assert experts and all(g["name"] == "ep_size_1" for g in experts)
    assert groups[-len(experts):] == experts, "dense groups first, then the expert groups, in a fixed order"


# ---- cosine schedule -----------------------------------------------------------------------------------

def cosine_lrs(model, cfg: OptimConfig, total: int, warmup: int) -> list[list[float]]:
    """Each group's lr at steps 0..total."""
    optimizer = build_optimizer(param_groups(model, cfg), cfg, CPU)
    scheduler = build_scheduler(total, warmup, cfg)(optimizer)
    lrs = []
    for _ in range(total + 1):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_factor_by_hand():
    cfg = OptimConfig(warmup_factor=0.1, min_lr_factor=0.01)
    # warm-up of 4 steps: 0.1 + 0.9 * s / 4
    assert [lr_factor(s, 14, 4, cfg) for s in range(4)] == pytest.approx([0.1, 0.325, 0.55, 0.775])
    # cosine over the remaining 10 steps: 0.01 + 0.99 * (1 + cos(pi * (s - 4) / 10)) / 2
    assert lr_factor(4, 14, 4, cfg) == pytest.approx(1.0)
    assert lr_factor(9, 14, 4, cfg) == pytest.approx(0.505)
    assert lr_factor(6, 14, 4, cfg) == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert lr_factor(14, 14, 4, cfg) == pytest.approx(0.01)
    assert lr_factor(30, 14, 4, cfg) == pytest.approx(0.01), "held at the floor after the last step"
    assert lr_factor(0, 10, 0, cfg) == pytest.approx(1.0), "no warm-up: the cosine starts at the full lr"


def test_cosine_schedule_per_group(model):
    cfg = OptimConfig(lr=1e-3, backbone_lr=1e-5, warmup_factor=0.1, min_lr_factor=0.01, bias_lr_scope="head")
    bases = [g["lr"] for g in param_groups(model, cfg)]
    lrs = cosine_lrs(model, cfg, total=14, warmup=4)
    assert lrs[0] == pytest.approx([0.1 * b for b in bases])
    assert lrs[2] == pytest.approx([0.55 * b for b in bases])
    assert lrs[4] == pytest.approx(bases)
    assert lrs[14] == pytest.approx([0.01 * b for b in bases])
    for step in lrs:     # one multiplier for every group: their ratios never change
        assert [lr / step[0] for lr in step] == pytest.approx([b / bases[0] for b in bases])
    head = [step[0] for step in lrs]
    assert all(a < b for a, b in zip(head[:4], head[1:5])), "warm-up rises"
    assert all(a > b for a, b in zip(head[4:14], head[5:15])), "cosine falls monotonically"


# ---- reference schedule --------------------------------------------------------------------------------

def truncated_normal(seed: int, bound: float) -> float:
    gen = torch.Generator().manual_seed(seed)
    while True:
        n = torch.randn(1, generator=gen).item()
        if abs(n) < bound:
            return n


def test_reference_lr_without_noise_by_hand():
    cfg = OptimConfig(lr=1e-3, warmup_factor=0.1, min_lr_factor=0.01, warmup_epochs=4, lr_noise=0.0)
    start, floor = 1e-4, 1e-5
    for base in (1e-3, 2e-5):   # warm-up starts from the absolute 0.1 x cfg.lr for every group, backbone too
        assert reference_lr(0, base, cfg, epochs=20) == pytest.approx(start)
        assert reference_lr(2, base, cfg, epochs=20) == pytest.approx(start + 2 * (base - start) / 4)
        assert reference_lr(4, base, cfg, epochs=20) == pytest.approx(
            floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * 4 / 20)))
        assert reference_lr(10, base, cfg, epochs=20) == pytest.approx(floor + 0.5 * (base - floor))
        assert reference_lr(20, base, cfg, epochs=20) == pytest.approx(floor), "the last epoch reaches the floor"
    assert reference_lr(2, 2e-5, cfg, epochs=20) < reference_lr(1, 2e-5, cfg, epochs=20), \
        "the backbone's lr falls towards its own during warm-up"


def test_reference_lr_noise_seeded_and_bounded():
    clean_cfg = OptimConfig(lr=1e-3, warmup_epochs=2, lr_noise=0.0)
    cfg = replace(clean_cfg, lr_noise=0.3, lr_noise_seed=7)
    noises = []
    for t in range(1, 12):
        clean = reference_lr(t, 1e-3, clean_cfg, epochs=12)
        noisy = reference_lr(t, 1e-3, cfg, epochs=12)
        assert noisy == reference_lr(t, 1e-3, cfg, epochs=12), "reproducible"
        assert noisy == pytest.approx(clean * (1 + truncated_normal(7 + t, 0.3)), rel=1e-12)
        noises.append(noisy / clean - 1)
    assert all(abs(n) < 0.3 for n in noises) and len({round(n, 9) for n in noises}) == len(noises)
    assert reference_lr(12, 1e-3, cfg, epochs=12) == reference_lr(12, 1e-3, clean_cfg, epochs=12), \
        "no noise on the last epoch"
    other = [reference_lr(t, 1e-3, replace(cfg, lr_noise_seed=8), epochs=12) for t in range(1, 12)]
    assert other != [reference_lr(t, 1e-3, cfg, epochs=12) for t in range(1, 12)]


def test_reference_schedule_holds_each_epochs_lr(model):
    cfg = OptimConfig(lr=1e-3, backbone_lr=1e-5, warmup_epochs=2, lr_noise=0.5, schedule="reference")
    bases = [g["lr"] for g in param_groups(model, cfg)]
    optimizer = build_optimizer(param_groups(model, cfg), cfg, CPU)
    scheduler = build_scheduler(15, 0, cfg, steps_per_epoch=3, epochs=5)(optimizer)
    for step in range(15):
        epoch = step // 3 + 1      # the reference steps its scheduler with the 1-based epoch before each epoch
        want = [reference_lr(epoch, b, cfg, 5) for b in bases]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(want, rel=1e-12), step
        optimizer.step()
        scheduler.step()
