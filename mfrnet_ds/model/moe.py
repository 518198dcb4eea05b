"""Sparse MoE on DeepSpeed's MoE layer: experts, the two routers, and a wrapper that keeps the aux loss.

DeepSpeed owns dispatch, capacity, token dropping and the expert-parallel all-to-all. We add:
- `Expert`: a token-wise D -> H -> D projection (optionally with its own residual, as the FRM experts).
- Two routers that plug into DeepSpeed's `MOELayer` in place of the gate it builds: its linear top-k gate
  (unchanged maths, plus routing statistics) and a cosine top-k router like the paper's.
- `SparseMoE`: returns a tensor, so it can stand in for a ViT block's MLP, and keeps the last forward's
  weighted aux loss and routing statistics for the model to collect once per forward.
- Distinct expert initialisation keyed on the *global* expert index, so that a run with expert
  parallelism builds exactly the experts a single process would.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter, top1gating, top2gating, topkgating
from torch import nn

from mfrnet_ds.config import MoEConfig


class Expert(nn.Module):
    """D -> H -> D with dropout between and no activation (as the paper's experts)."""

    def __init__(self, dim: int, hidden: int, dropout: float, residual: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.drop(self.fc1(x)))
        return x + y if self.residual else y


class _Router(TopKGate):
    """DeepSpeed's gate interface; subclasses only say how token->expert logits are computed."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__(dim, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.eval_capacity_factor,
                         cfg.min_capacity, _deepspeed_noise(cfg), cfg.drop_tokens, use_rts=True)
        self.normal_noise_std = cfg.gate_noise_scale / cfg.num_experts if cfg.gate_noise == "normal" else 0.0
        self.eval_drop_tokens = cfg.eval_drop_tokens
        self.dropped_fraction = torch.zeros(())

    def logits(self, x_fp32: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        if not sparse_routes:
            raise ValueError("mfrnet_ds routers serve DeepSpeed's sparse dispatch only")
        x = input.float()  # routing in fp32 whatever the model dtype, as DeepSpeed's own gate
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x, device=x.device)
        logits = self.logits(x)
        if self.normal_noise_std and self.training:
            logits = logits + torch.randn_like(logits) * self.normal_noise_std
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        drop = self.drop_tokens if self.training else self.eval_drop_tokens
        if self.k == 1:
            # Random token selection only while training: evaluation must not depend on the RNG.
            out = top1gating(logits, cf, self.min_capacity, used_token,
                             self.noisy_gate_policy if self.training else None, drop,
                             self.use_rts and self.training, self.ep_group, sparse_routes=True)
        elif self.k == 2:
            out = top2gating(logits, cf, self.min_capacity, drop, self.ep_group,
                             self.top2_2nd_expert_sampling, sparse_routes=True)
        else:
            out = topkgating(logits, self.k, cf, self.min_capacity, drop, self.ep_group, sparse_routes=True)
        indices = out[3]  # (k, tokens); a route evicted by the capacity limit has expert index -1
        self.dropped_fraction = (indices < 0).float().mean().detach()
        return out


class LinearRouter(_Router):
    """DeepSpeed's top-k gate: logits = x W (its `wg` weight)."""

    def logits(self, x_fp32):
        return F.linear(x_fp32, self.wg.weight.float())


class CosineRouter(_Router):
    """Cosine top-k router: project tokens to a small space, compare with one learned vector per expert.

    logits = scale * cos(P x, e_j), with a learned scale exp(t) clamped at 1/min_temperature so the
    softmax cannot become arbitrarily sharp.
    """

    def __init__(self, dim: int, cfg: MoEConfig, proj_dim: int = 256, init_temperature: float = 0.5,
                 min_temperature: float = 0.01):
        super().__init__(dim, cfg)
        del self.wg  # the linear gate's weight is not used; keep it out of the optimiser
        self.proj = nn.Linear(dim, proj_dim)
        # one learned vector per expert; not named "*expert*": DeepSpeed files every state-dict key holding
        # that word as an expert weight when it checkpoints
        self.centroids = nn.Parameter(torch.empty(cfg.num_experts, proj_dim))
        nn.init.normal_(self.centroids, std=0.32)
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))  # 1-d: DeepSpeed cannot broadcast 0-d
        self.max_log_scale = math.log(1.0 / min_temperature)

    def logits(self, x_fp32):
        q = F.normalize(F.linear(x_fp32, self.proj.weight.float(), self.proj.bias.float()), dim=-1)
        keys = F.normalize(self.centroids.float(), dim=-1)
        scale = self.log_scale.float().clamp(max=self.max_log_scale).exp()
        return scale * (q @ keys.t())          # (tokens, experts)


ROUTERS = {"linear": LinearRouter, "cosine": CosineRouter}


def _deepspeed_noise(cfg: MoEConfig) -> str | None:
    """The noise policies DeepSpeed's gating applies itself; ours ("normal") is added to the logits above."""
    return cfg.gate_noise if cfg.gate_noise in ("RSample", "Jitter") else None


class SparseMoE(nn.Module):
    """A DeepSpeed MoE layer that returns a tensor and keeps what its last forward measured.

    After each forward: `aux_loss` (the layer's load-balancing loss x its weight), `balance_loss` (the same,
    unweighted and detached, for logging), `expert_counts` (tokens routed to each expert on this rank, before
    capacity), `dropped_fraction` (routes over capacity). DeepSpeed's gate computes the balance loss from this
    rank's tokens only.
    """

    def __init__(self, dim: int, expert: nn.Module, cfg: MoEConfig, name: str):
        super().__init__()
        self.name = name
        self.aux_weight = cfg.aux_weight
        self.num_experts = cfg.num_experts
        self.ep_size = cfg.ep_size
        self.moe = MoE(dim, expert, num_experts=cfg.num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                       min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens,
                       noisy_gate_policy=_deepspeed_noise(cfg))
        # DeepSpeed's MoE takes no gate argument: swap the gate it built, keeping its dispatch and all-to-all.
        self.moe.deepspeed_moe.gate = ROUTERS[cfg.router](dim, cfg)
        self.aux_loss: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self.dropped_fraction: torch.Tensor | None = None

    @property
    def router(self) -> _Router:
        return self.moe.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, l_aux, counts = self.moe(x)
        self.aux_loss = l_aux * self.aux_weight
        self.balance_loss = l_aux.detach().float()
        self.expert_counts = counts
        self.dropped_fraction = self.router.dropped_fraction
        return out

    @torch.no_grad()
    def init_experts(self, seed: int, ep_rank: int = 0) -> None:
        """Give every expert its own weights, drawn from a seed of (run seed, layer, global expert index).

        DeepSpeed builds the local experts as deep copies of one module, so they start identical;
        keying on the global index makes ep_size=N hold the same experts as ep_size=1.
        """
        n_local = len(self.local_experts)
        for i, expert in enumerate(self.local_experts):
            global_index = ep_rank * n_local + i
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{self.name}/{global_index}".encode()))
            for p in expert.parameters():
                if p.dim() >= 2:
                    nn.init.xavier_uniform_(p, generator=gen)
                else:
                    nn.init.zeros_(p)


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """DeepSpeed's default layout: expert-parallel groups are runs of `ep_size` consecutive ranks."""
    return rank % ep_size


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


# DeepSpeed names a local expert `...deepspeed_experts.<local index>...`; checkpoints and exports need the
# global index, which depends on the expert-parallel rank.
_EXPERT_KEY = ".deepspeed_experts."


def expert_key_to_global(key: str, ep_rank: int, num_local: int) -> str:
    head, _, tail = key.partition(_EXPERT_KEY)
    local, _, rest = tail.partition(".")
    return f"{head}{_EXPERT_KEY}{ep_rank * num_local + int(local)}.{rest}"


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Select from a full (all experts, ep_size=1 numbering) state dict what `model` holds on `rank`."""
    out = {}
    for key in model.state_dict():
        if _EXPERT_KEY in key:
            layer = _layer_of(model, key)
            ep_rank = expert_parallel_rank(rank, layer.ep_size)
            out[key] = full[expert_key_to_global(key, ep_rank, len(layer.local_experts))]
        else:
            out[key] = full[key]
    return out


def _layer_of(model: nn.Module, key: str) -> SparseMoE:
    prefix = key.partition(".moe.deepspeed_moe")[0]
    layer = model.get_submodule(prefix)
    assert isinstance(layer, SparseMoE), key
    return layer
