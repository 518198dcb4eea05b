"""The paper recipes train what the reference (stone96123/MFRNet) trains: its lr schedule, its parameter groups,
its FFM weight heads, its per-dataset heads, its strictness about pretrained weights.

Expected values are written from the reference's rules (solver/scheduler_factory.py + cosine_lr.py +
scheduler.py, solver/make_optimizer.py, modeling/clip/model.py, configs/*/MFRNet.yml), not from this code.
"""
import math

import pytest
import torch

from launcher import ROOT
from mfrnet_ds import ConfigError, load_config
from mfrnet_ds.engine.optim import build_scheduler, param_groups
from mfrnet_ds.model import build_model

BASE_LR, BACKBONE_LR = 3.5e-4, 5e-6


def _perturbation(t: int) -> float:
    """The reference's noise for epoch t: torch.Generator seeded 42 + t, standard normals redrawn until
    |n| < 0.67, applied as lr * (1 + n) for 0 <= t < MAX_EPOCHS."""
    g = torch.Generator()
    g.manual_seed(42 + t)
    while True:
        n = torch.randn(1, generator=g).item()
        if abs(n) < 0.67:
            return n


def _reference_lr(t: int, group_lr: float, warmup: int, epochs: int) -> float:
    # CosineLRScheduler(t_initial=epochs, lr_min=0.001*BASE_LR, warmup_lr_init=0.1*BASE_LR, warmup_t=warmup,
    # warmup_prefix=False, cycle_limit=1, t_in_epochs=True, noise_range_t=(0, epochs)), stepped with the
    # 1-based epoch number before each epoch
    if t < warmup:
        lr = 0.1 * BASE_LR + t * (group_lr - 0.1 * BASE_LR) / warmup
    else:
        lr = 0.001 * BASE_LR + 0.5 * (group_lr - 0.001 * BASE_LR) * (1 + math.cos(math.pi * t / epochs))
    return lr * (1 + _perturbation(t)) if t < epochs else lr


@pytest.mark.parametrize("recipe, warmup, epochs", [("rgbnt201", 10, 45), ("rgbnt100", 5, 45),
                                                    ("msvr310", 10, 50)])
def test_reference_schedule_every_epoch_and_group(recipe, warmup, epochs):
    cfg = load_config(ROOT / f"configs/{recipe}.yaml", ["model.pretrained=none"]).optim
    assert cfg.schedule == "reference" and cfg.warmup_epochs == warmup
    group_lrs = [BASE_LR, 2 * BASE_LR, BACKBONE_LR]          # new modules, their biases, the CLIP tower
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
    opt = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)])
    steps_per_epoch = 3
    sched = build_scheduler(epochs * steps_per_epoch, 0, cfg, steps_per_epoch, epochs)(opt)
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            for g, lr in zip(opt.param_groups, group_lrs):
                assert g["lr"] == pytest.approx(_reference_lr(epoch + 1, lr, warmup, epochs), rel=1e-9)
            opt.step()
            sched.step()
    # hand-checked anchors: the tower's lr *falls* in warm-up, the last epoch sits on the absolute floor
    first = 0.1 * BASE_LR + (BACKBONE_LR - 0.1 * BASE_LR) / warmup
    assert first > BACKBONE_LR
    assert _reference_lr(1, BACKBONE_LR, warmup, epochs) == pytest.approx(first * (1 + _perturbation(1)))
    assert _reference_lr(epochs, BACKBONE_LR, warmup, epochs) == pytest.approx(3.5e-7)


def test_cosine_schedule_is_per_step_and_relative():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_epochs=1"]).optim
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": BACKBONE_LR}])
    sched = build_scheduler(100, 10, cfg)(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * BACKBONE_LR)   # relative to the group's own lr
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(BACKBONE_LR)


def _reference_group_lr(name: str) -> float:
    """make_optimizer's rules translated to our names: "bias" -> 2 x BASE_LR; then the CLIP tower ("base" in
    the reference's keys; `vit.` here) -> 5e-6 for weights and biases alike; then anything in a MoE layer or the
    FFM ("moe", "gen_", "glw" there; `.moe.` / `ffm.` here) -> BASE_LR, biases included."""
    lr = 2 * BASE_LR if "bias" in name else BASE_LR
    if name.startswith("vit."):
        lr = BACKBONE_LR
    if ".moe." in name or name.startswith("ffm."):
        lr = BASE_LR
    return lr


@pytest.mark.parametrize("recipe", ["rgbnt201", "rgbnt100"])
def test_parameter_groups_as_the_reference(recipe):
    cfg = load_config(ROOT / f"configs/{recipe}.yaml", ["model.pretrained=none", "model.num_classes=10"])
    model = build_model(cfg)
    groups = param_groups(model, cfg.optim)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in lr_of, "a parameter in two groups"
            lr_of[id(p)] = g["lr"]
            assert g["weight_decay"] == 1e-4
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(trainable)
    wrong = [(n, lr_of[id(p)], _reference_group_lr(n)) for n, p in trainable.items()
             if lr_of[id(p)] != pytest.approx(_reference_group_lr(n))]
    assert not wrong, wrong[:5]
    doubled = sorted(n for n, p in trainable.items() if lr_of[id(p)] == pytest.approx(2 * BASE_LR))
    if recipe == "rgbnt100":   # the token reductions' LayerNorm and Linear biases only
        assert doubled == [f"reductions.{m}.{part}.bias" for m in range(3) for part in ("fc", "norm")]
    else:                      # the concat head has no trainable bias outside the tower and the MoE
        assert doubled == []
    named = dict(model.named_parameters())
    assert lr_of[id(named["vit.blocks.0.attn.qkv.bias"])] == BACKBONE_LR
    assert lr_of[id(named["ffm.weight_heads.rgb_to_nir.bias"])] == BASE_LR
    assert not named["necks.0.bn.bias"].requires_grad


def test_ffm_weight_heads_score_the_sources_input_tokens():
    from mfrnet_ds.config import FFMConfig
    from mfrnet_ds.model.fusion import PAIRS, FeatureFusion, _pair_name

    torch.manual_seed(0)
    ffm = FeatureFusion(16, FFMConfig(hidden=8, gate_noise="none", dropout=0.0)).eval()
    tokens = [torch.randn(2, 5, 16) for _ in range(3)]
    with torch.no_grad():
        fused = ffm(list(tokens))
        gen = {g: m(torch.cat(tokens)).chunk(3) for g, m in ffm.generators.items()}
        for t in range(3):
            sources = [s for s in range(3) if s != t]
            # reference: glw_<S><T>(x_S) = Linear(mean over the source's tokens, CLS included), softmax over 2
            scores = torch.cat([ffm.weight_heads[_pair_name(s, t)](tokens[s].mean(1)) for s in sources], 1)
            w = scores.softmax(1)
            expected = 0.5 * tokens[t] + sum(w[:, i, None, None] * gen[PAIRS[(s, t)]][s] for i, s in enumerate(sources))
            torch.testing.assert_close(fused[t], expected)


def test_nt_path_reference_mode_uses_the_raw_score():
    from mfrnet_ds.config import FFMConfig
    from mfrnet_ds.model.fusion import FeatureFusion

    torch.manual_seed(0)
    rgb = torch.randn(2, 5, 16)
    outs = {}
    for ref in (False, True):
        torch.manual_seed(1)
        ffm = FeatureFusion(16, FFMConfig(hidden=8, gate_noise="none", dropout=0.0), reference_nt=ref).eval()
        with torch.no_grad():
            outs[ref] = ffm([rgb, None, None])
            gen_n = ffm.generators["A"](rgb)
            score = ffm.weight_heads["rgb_to_nir"](rgb.mean(1))
    torch.testing.assert_close(outs[False][1], gen_n)                       # softmax over one source: weight 1
    torch.testing.assert_close(outs[True][1], score[:, :, None] * gen_n)     # the released code's nt path


@pytest.mark.parametrize("pool, reduced", [("cls", False), ("cls_mean", True)])
def test_per_modality_head_pool(pool, reduced):
    cfg = load_config(None, ["model.head=per_modality", f"model.head_pool={pool}", "model.img_size=[32,64]",
                             "model.num_classes=5"])
    model = build_model(cfg).eval()
    assert (model.reductions is not None) == reduced
    with torch.no_grad():
        out = model(torch.randn(2, 3, 3, 32, 64), torch.zeros(2, dtype=torch.long))
    assert len(out.features) == 3 and all(f.shape == (2, 32) for f in out.features)


def test_recipes_say_what_the_reference_does():
    for recipe, pool in (("rgbnt201", None), ("rgbnt100", "cls_mean"), ("msvr310", "cls")):
        cfg = load_config(ROOT / f"configs/{recipe}.yaml", ["model.pretrained=none"])
        assert cfg.train.eval_every == 1 and cfg.optim.schedule == "reference"
        for moe in (cfg.model.ffm, cfg.model.frm):
            assert (moe.aux_loss, moe.overflow, moe.router, moe.gate_noise) == ("tutel", "priority", "cosine", "normal")
        assert cfg.model.head == ("concat" if pool is None else "per_modality")
        if pool:
            assert cfg.model.head_pool == pool
        assert not cfg.model.reference_mode


@pytest.mark.parametrize("recipe", ["rgbnt201", "rgbnt100", "msvr310"])
def test_recipe_without_weights_stops_with_a_message(recipe):
    with pytest.raises(ConfigError, match=r"model\.pretrained=.*none"):
        load_config(ROOT / f"configs/{recipe}.yaml")


def test_all_1d_bias_scope_doubles_every_bias_and_norm_gain():
    cfg = load_config(ROOT / "configs/demo.yaml", ["model.num_classes=10", "model.frm.ep_size=1"])
    assert cfg.optim.bias_lr_scope == "all_1d"
    model = build_model(cfg)
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg.optim) for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            role_lr = cfg.optim.backbone_lr if name.startswith("vit.") and ".moe." not in name else cfg.optim.lr
            assert lr_of[id(p)] == pytest.approx(role_lr * (2.0 if p.dim() == 1 else 1.0)), name
