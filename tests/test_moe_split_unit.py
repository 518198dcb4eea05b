"""The deterministic split of MoE experts over expert-parallel ranks (model/moe.py), in one process: which global
experts a rank holds for every ep_size that divides the experts, and that every global expert starts with the
same weights whatever ep_size and rank build it. Resume re-sharding and expert parallelism rely on both."""
from __future__ import annotations

import re

import pytest
import torch

from mfrnet_ds import build_model, load_config
from mfrnet_ds.engine.ckpt import expert_key_to_global, shard_state_dict
from mfrnet_ds.engine.dist import expert_parallel_rank, place_experts
from mfrnet_ds.model.moe import moe_layers

FRM_EXPERTS, FFM_EXPERTS = 4, 3
EXPERT = re.compile(r"\.deepspeed_experts\.(\d+)\.")


def config(frm_ep: int = 1, ffm_ep: int = 1):
    return load_config(None, ["model.img_size=[32,32]", "model.num_classes=3",
                              f"model.frm.num_experts={FRM_EXPERTS}", f"model.frm.ep_size={frm_ep}",
                              f"model.ffm.num_experts={FFM_EXPERTS}", f"model.ffm.ep_size={ffm_ep}"])


def model_for_rank(cfg, rank: int):
    """The model the process of global rank `rank` builds (the one place to adapt if build_model's API moves)."""
    return place_experts(build_model(cfg), cfg.train.seed, rank)


def global_state(model, rank: int) -> dict[str, torch.Tensor]:
    """The model's state dict with expert keys renamed to their global expert index."""
    out = {}
    for layer_prefix, layer in ((n, m) for n, m in model.named_modules() if m in moe_layers(model)):
        ep_rank = expert_parallel_rank(rank, layer.ep_size)
        for key, value in layer.state_dict(prefix=f"{layer_prefix}.").items():
            if EXPERT.search(key):
                out[expert_key_to_global(key, ep_rank, len(layer.local_experts))] = value
    return out


def held_experts(model, rank: int) -> dict[str, list[int]]:
    """Layer name -> the global expert indices this rank's model holds."""
    return {name: sorted({int(EXPERT.search(k).group(1)) for k in keys})
            for name, keys in _expert_keys_by_layer(global_state(model, rank)).items()}


def _expert_keys_by_layer(state: dict) -> dict[str, list[str]]:
    layers: dict[str, list[str]] = {}
    for key in state:
        layers.setdefault(key.partition(".moe.deepspeed_moe")[0], []).append(key)
    return layers


@pytest.fixture(scope="module")
def single():
    """ep_size 1: every expert in one process."""
    return model_for_rank(config(), 0)


def test_expert_parallel_rank_is_position_in_a_run_of_consecutive_ranks():
    assert [expert_parallel_rank(r, 2) for r in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [expert_parallel_rank(r, 3) for r in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [expert_parallel_rank(r, 1) for r in range(3)] == [0, 0, 0]


def test_expert_key_to_global():
    key = "vit.blocks.3.mlp.moe.deepspeed_moe.experts.deepspeed_experts.1.fc2.weight"
    assert expert_key_to_global(key, ep_rank=0, num_local=2) == key
    assert expert_key_to_global(key, ep_rank=1, num_local=2) == key.replace("experts.1.", "experts.3.")
    assert expert_key_to_global(key, ep_rank=3, num_local=1) == key.replace("experts.1.", "experts.4.")


@pytest.mark.parametrize("frm_ep, ffm_ep", [(1, 1), (2, 1), (4, 1), (1, 3), (2, 3)])
def test_which_global_experts_each_rank_holds(frm_ep, ffm_ep):
    cfg = config(frm_ep, ffm_ep)
    world = frm_ep * ffm_ep       # a world both ep sizes divide
    for rank in range(world):
        frm_rank, ffm_rank = rank % frm_ep, rank % ffm_ep
        n_frm, n_ffm = FRM_EXPERTS // frm_ep, FFM_EXPERTS // ffm_ep
        assert held_experts(model_for_rank(cfg, rank), rank) == {
            "vit.blocks.3.mlp": list(range(frm_rank * n_frm, (frm_rank + 1) * n_frm)),
            "ffm.generators.A": list(range(ffm_rank * n_ffm, (ffm_rank + 1) * n_ffm)),
            "ffm.generators.B": list(range(ffm_rank * n_ffm, (ffm_rank + 1) * n_ffm))}, rank


def test_experts_of_a_layer_start_distinct(single):
    state = global_state(single, 0)
    fc1 = [state[f"vit.blocks.3.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"]
           for e in range(FRM_EXPERTS)]
    assert all(not torch.equal(fc1[a], fc1[b]) for a in range(FRM_EXPERTS) for b in range(a))


@pytest.mark.parametrize("frm_ep, ffm_ep", [(4, 1), (2, 3)])
def test_same_weights_per_global_expert_whatever_ep_size(single, frm_ep, ffm_ep):
    cfg = config(frm_ep, ffm_ep)
    full = single.state_dict()
    full_experts = global_state(single, 0)
    seen = set()
    for rank in range(frm_ep * ffm_ep):
        model = model_for_rank(cfg, rank)
        mine = global_state(model, rank)
        for key, value in mine.items():
            assert torch.equal(value, full_experts[key]), (rank, key)
        seen |= set(mine)
        dense = {k: v for k, v in model.state_dict().items() if not EXPERT.search(k)}
        assert all(torch.equal(v, full[k]) for k, v in dense.items()), "the rest of the model is the same too"
        # and a full (ep_size 1) state dict sharded for this rank is exactly what the rank built
        sharded = shard_state_dict(full, model, rank)
        assert sharded.keys() == model.state_dict().keys()
        assert all(torch.equal(sharded[k], v) for k, v in model.state_dict().items())
    assert seen == set(full_experts), "the ranks together hold every expert"
