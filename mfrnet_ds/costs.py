"""The cost model behind `mfrnet_ds.plan`: what one micro step of a config holds and computes per GPU.

MoE facts are read from a model built on the meta device; FLOPs are counted by torch.utils.flop_counter on a
one-expert copy and scaled to DeepSpeed's padded expert buffers; activation bytes follow what autograd keeps
per block (see `activation_bytes`). `mfrnet_ds.plan` turns these into memory, traffic and time per step.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mfrnet_ds.config import Config
from mfrnet_ds.presets import PRESETS


def _cpu_flash_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels only; the CPU one does the same two matmuls
    b, h, sq, d = q
    return 2 * b * h * sq * k[-2] * (d + v[-1])


FLOP_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


@dataclass(frozen=True)
class MoEFacts:
    name: str
    num_experts: int
    ep_size: int
    top_k: int
    capacity_factor: float
    min_capacity: int
    drop_tokens: bool
    hidden: int              # expert hidden width
    params_per_expert: int
    router_proj: int         # cosine router's projection width; 0 for the linear gate


def meta_model(config: Config):
    from mfrnet_ds.model.mfrnet import MFRNet
    with torch.device("meta"):
        return MFRNet(config.model)


def moe_facts(model) -> list[MoEFacts]:
    facts = []
    for layer in model.moe_layers:
        expert = layer.local_experts[0]
        cfg = layer.router
        proj = getattr(cfg, "proj", None)
        facts.append(MoEFacts(layer.name, layer.num_experts, layer.ep_size, cfg.k, cfg.capacity_factor,
                              cfg.min_capacity, cfg.drop_tokens, expert.fc1.out_features,
                              sum(p.numel() for p in expert.parameters()), proj.out_features if proj else 0))
    return facts


def capacity(moe: MoEFacts, tokens: int) -> int:
    """Slots per expert for `tokens` tokens, as DeepSpeed's top-k gates size them."""
    k = moe.top_k if moe.drop_tokens else 1   # no dropping: the buffer fits the fullest expert; balanced here
    cf = moe.capacity_factor if moe.drop_tokens else 1.0
    return max(math.ceil(tokens / moe.num_experts * cf * k), moe.min_capacity)


def forward_flops(config: Config, facts: list[MoEFacts], micro: int, tokens_per_image: int) -> dict:
    """Forward FLOPs of one micro batch on one GPU: dense part + padded expert buffers + routers."""
    from mfrnet_ds.model.moe import SparseMoE
    one = copy.deepcopy(config)
    for moe in (one.model.ffm, one.model.frm):
        moe.num_experts, moe.ep_size, moe.top_k, moe.capacity_factor, moe.min_capacity = 1, 1, 1, 1.0, 0
    model = meta_model(one).to_empty(device="cpu").eval()
    for t in [*model.parameters(), *model.buffers()]:
        t.detach().zero_()        # values do not change FLOPs; zeros keep the forward finite
    H, W = config.model.img_size
    with FlopCounterMode(display=False, custom_mapping=FLOP_EXTRA) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 3, H, W), torch.zeros(1, dtype=torch.long))
    per_module = counter.get_flop_counts()     # "MFRNet.<module path>" -> {op: flops}
    one_expert = {m.name: sum(per_module[f"{type(model).__name__}.{prefix}.moe.deepspeed_moe.experts."
                                         f"deepspeed_experts.0"].values())
                  for prefix, m in model.named_modules() if isinstance(m, SparseMoE)}
    tokens_1 = 3 * tokens_per_image                      # one sample: three images
    tokens = micro * tokens_1
    experts = routers = 0.0
    for moe in facts:
        per_slot = one_expert[moe.name] / tokens_1      # E=1, cf=1, no minimum: one slot per token
        experts += per_slot * moe.num_experts * capacity(moe, tokens)
        routers += _router_flops(config, moe, tokens_1) * micro
    dense = (counter.get_total_flops() - sum(one_expert.values())) * micro
    return {"dense": dense, "experts": experts, "routers": routers, "total": dense + experts + routers}


def _router_flops(config: Config, moe: MoEFacts, tokens: int) -> float:
    """Extra router FLOPs at the real expert count over the one-expert copy that was counted."""
    from mfrnet_ds.model.moe import ROUTERS
    src = config.model.ffm if moe.name.startswith("ffm") else config.model.frm
    width = width_of(config)
    out = []
    for experts in (moe.num_experts, 1):
        cfg = dataclasses.replace(src, num_experts=experts, top_k=1, ep_size=1)
        router = ROUTERS[src.router](width, cfg)
        with FlopCounterMode(display=False) as c, torch.no_grad():
            router.logits(torch.zeros(tokens, width))
        out.append(c.get_total_flops())
    return out[0] - out[1]


def width_of(config: Config) -> int:
    return PRESETS[config.model.preset].width


def activation_bytes(config: Config, facts: list[MoEFacts], micro: int, tokens_per_image: int, b: int) -> dict:
    """Tensors autograd keeps for backward, per component, at `micro` samples (3 images each).

    Per token of a ViT block (width D, MLP 4D, h heads): ln_1 input, qkv input, q/k/v, attention output and
    its reshaped copy, ln_2 input (D each: 8D) + the attention's log-sum-exp (4h bytes) + LayerNorm
    statistics; MLP: fc1 input (D) and fc1 output, QuickGELU's sigmoid, fc2 input (3 x 4D).
    A MoE layer instead of the MLP: router input in fp32 (4D bytes), gate softmax and int64 one-hot
    (12E bytes), the cosine router's fp32 projection, logits before scaling and norm (4P + 4E + 4 bytes:
    model/cosine.py); per slot of the dispatch buffer (E x capacity of them): expert input (D) and hidden (H)
    plus the dropout mask (H bytes);
    per token the gathered expert output (k x D) kept for the gate multiply. The FFM's fused mix keeps each
    generator's output (D). Plus the input images and ln_pre / final-norm inputs. Fused attention assumed:
    no T x T matrix is kept (timm uses scaled_dot_product_attention).
    """
    p = PRESETS[config.model.preset]
    D, h, depth = p.width, p.heads, p.depth
    n = 3 * micro * tokens_per_image                     # tokens of the micro batch
    attention = n * (8 * D * b + 4 * h + 4 * 4)          # + mean/rstd of two LayerNorms
    mlp = n * (D + 3 * 4 * D) * b

    def moe_bytes(moe: MoEFacts, keep_output: bool) -> float:
        slots = moe.num_experts * capacity(moe, n)
        cosine = 4 * (moe.router_proj + moe.num_experts + 1) if moe.router_proj else 0
        router = n * (4 * D + 12 * moe.num_experts + cosine)
        experts = slots * ((D + moe.hidden) * b + moe.hidden)
        combine = n * moe.top_k * D * b + (n * D * b if keep_output else 0)
        return router + experts + combine

    frm = {f.name for f in facts if f.name.startswith("frm.")}
    out = {
        "embedding": 3 * micro * 3 * config.model.img_size[0] * config.model.img_size[1] * b + 2 * n * D * b,
        "FFM": sum(moe_bytes(f, keep_output=True) for f in facts if f.name.startswith("ffm.")),
        "dense blocks": (depth - len(frm)) * (attention + mlp),
        "FRM blocks": len(frm) * attention + sum(moe_bytes(f, False) for f in facts if f.name in frm),
    }
    out["total"] = sum(out.values())
    return out


def peer_fractions(world: int, gpus_per_node: int, group_of) -> tuple[float, float]:
    """Mean over ranks of the share of an all-to-all's peers (self included in the count) on the same
    node (other GPUs) and on other nodes."""
    intra = inter = 0.0
    for r in range(world):
        group = group_of(r)
        same = sum(1 for q in group if q // gpus_per_node == r // gpus_per_node)
        intra += (same - 1) / len(group)
        inter += (len(group) - same) / len(group)
    return intra / world, inter / world
