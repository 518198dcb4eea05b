"""Sparse MoE on DeepSpeed's MoE layer: experts, the two routers, and a wrapper that keeps the aux loss.

DeepSpeed owns the gating functions, capacity, token dropping and the expert-parallel all-to-all. We add:
- `Expert` (moe_dispatch.py): a token-wise D -> H -> D projection (optionally with its own residual, as the
  FRM experts), and `GroupedMOELayer` (moe_dispatch.py): DeepSpeed's layer with cheaper dispatch/combine and
  the local experts as batched matmuls, equal to DeepSpeed's forward.
- Two routers that plug into DeepSpeed's `MOELayer` in place of the gate it builds: its linear top-k gate
  (unchanged maths, plus routing statistics) and a cosine top-k router like the paper's.
- `SparseMoE`: returns a tensor, so it can stand in for a ViT block's MLP, and keeps the last forward's
  weighted aux loss and routing statistics for the model to collect once per forward.
- Distinct expert initialisation keyed on the *global* expert index, so that a run with expert
  parallelism builds exactly the experts a single process would.
- Two options from Tutel, the library the authors' reference code trains with (`model.*.aux_loss=tutel`:
  its load + importance loss; `model.*.overflow=priority`: its batch-prioritised routing), and shared expert
  weights (`SparseMoE(shared_experts=True)`), the reference's behaviour, for ablations.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import (TopKGate, _capacity, multiplicative_jitter, top1gating, top2gating,
                                       topkgating)
from torch import nn

from mfrnet_ds.config import MoEConfig
from mfrnet_ds.model.cosine import cosine_logits
from mfrnet_ds.model.moe_dispatch import Expert as Expert  # re-exported: the experts' home is moe_dispatch
from mfrnet_ds.model.moe_dispatch import GroupedMOELayer


def tutel_balance_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, k: int) -> torch.Tensor:
    """Tutel's load + importance balancing loss (its `load_importance_loss`, tutel/impls/losses.py, as
    tutel/impls/moe_layer.py calls it with is_gshard_loss=False).

    logits: (tokens, experts) router logits without routing noise; noisy_logits: the same plus the training
    noise (equal to `logits` where no noise is added); noise_std: the std of that noise, which Tutel also uses
    to smooth the load (gate_noise / num_experts); k: top-k. With p = softmax(logits), for every expert e:

        importance_e = sum_s p[s, e]
        t_s          = k-th largest of noisy_logits[s, :]            (the noisy logit of the token's last pick)
        load_e       = sum_s Phi((p[s, e] - t_s) / noise_std)         (Phi: standard normal CDF)
        cv2(v)       = var(v) / (mean(v)^2 + 1e-10)                   (var over experts with the n-1 divisor)
        loss         = (cv2(importance) + cv2(load)) / 2

    As in Tutel, the load compares a probability p[s, e] with a logit t_s. Differentiable in both inputs.
    """
    if noise_std <= 0:
        raise ValueError(f"tutel_balance_loss: noise_std={noise_std} must be > 0 (it smooths the load)")
    num_experts = logits.shape[1]
    if num_experts < 2:
        return logits.new_zeros(())   # one expert: nothing to balance (the variance would be undefined)
    probs = F.softmax(logits.float(), dim=1)
    k = min(int(k), num_experts)
    threshold = torch.topk(noisy_logits.float(), k, dim=1).values[:, -1:]
    load = torch.special.ndtr((probs - threshold) / noise_std).sum(0)
    importance = probs.sum(0)

    def cv2(v):
        return v.var() / (v.mean() ** 2 + 1e-10)

    return (cv2(importance) + cv2(load)) / 2


def _keep_by_priority(indices: torch.Tensor, priority: torch.Tensor, num_experts: int,
                      capacity: int | torch.Tensor) -> torch.Tensor:
    """Which routes fit in their expert's `capacity` slots when the best tokens are served first.

    indices: (k, tokens) expert of each route, -1 for none; priority: (tokens,). Routes are served rank by
    rank (every token's first choice before any second choice) and, within a rank, in order of decreasing
    priority, ties by token order (Tutel's batch-prioritised routing). Returns a (k, tokens) bool mask.
    """
    k, tokens = indices.shape
    order = torch.sort(priority, descending=True, stable=True).indices
    served = indices[:, order].reshape(-1).long()            # rank-major, best token first within a rank
    routed = served >= 0
    expert = served.clamp(min=0)
    onehot = F.one_hot(expert, num_experts) * routed.unsqueeze(1)
    position = (onehot.cumsum(0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
    keep_served = (routed & (position < capacity)).view(k, tokens)
    keep = torch.zeros_like(keep_served)
    keep[:, order] = keep_served
    return keep


def _slot_locations(indices: torch.Tensor, num_experts: int, rank_major: bool) -> torch.Tensor:
    """Each kept route's slot in its expert's buffer, numbered as DeepSpeed's gates number them.

    rank_major (top1gating, top2gating): first choices in token order, then second choices after them;
    otherwise (topkgating): all routes in token order. Routes with index -1 get 0 (DeepSpeed's value).
    """
    kept = indices >= 0
    expert = indices.long().clamp(min=0)
    onehot = F.one_hot(expert, num_experts) * kept.unsqueeze(-1)        # (k, tokens, experts)
    if rank_major:
        totals = onehot.sum(1, keepdim=True)                              # (k, 1, experts)
        before = onehot.cumsum(1) - 1 + (totals.cumsum(0) - totals)
    else:
        before = onehot.sum(0).cumsum(0) - 1                              # (tokens, experts)
        before = before.unsqueeze(0).expand_as(onehot)
    return (before.gather(2, expert.unsqueeze(-1)).squeeze(-1) * kept).to(torch.int32)


class _Router(TopKGate):
    """DeepSpeed's gate interface; subclasses only say how token->expert logits are computed.

    The gate returns what DeepSpeed's top-k gating functions return for sparse_routes=True: (aux loss,
    capacity, num_experts, expert index (k, tokens) with -1 for a route not served, slot location
    (k, tokens), gate weight (k, tokens), tokens routed to each expert before capacity). `cfg.aux_loss` picks
    the aux loss ("switch": DeepSpeed's; "tutel": `tutel_balance_loss`) and `cfg.overflow` which routes an
    expert over capacity keeps ("random": DeepSpeed's choice: top-1 random token selection while training and
    at evaluation torch.topk's pick among the expert's tokens (not token order), top-2 first-come, top-k>2 the
    route's own gate; "priority": `_keep_by_priority`).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__(dim, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.eval_capacity_factor,
                         cfg.min_capacity, _deepspeed_noise(cfg), cfg.drop_tokens, use_rts=True)
        self.normal_noise_std = cfg.gate_noise_scale / cfg.num_experts if cfg.gate_noise == "normal" else 0.0
        self.eval_drop_tokens = cfg.eval_drop_tokens
        self.aux_kind = cfg.aux_loss
        self.overflow = cfg.overflow
        # Tutel smooths the load with its gate noise std (gate_noise / experts) whatever noise the gate adds
        self.load_noise_std = cfg.gate_noise_scale / cfg.num_experts
        self.dropped_fraction = torch.zeros(())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, experts) fp32 logits of tokens x in the model dtype."""
        raise NotImplementedError

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        if not sparse_routes:
            raise ValueError("mfrnet_ds routers serve DeepSpeed's sparse dispatch only")
        # No fp32 copy of every token (DeepSpeed's gate makes one): the projection runs in the model dtype,
        # the logits and everything after them in fp32. In an fp32 model this is DeepSpeed's computation.
        x = input
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x, device=x.device)
        clean = self.logits(x)
        logits = clean
        if self.normal_noise_std and self.training:
            logits = clean + torch.randn_like(clean) * self.normal_noise_std
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        drop = self.drop_tokens if self.training else self.eval_drop_tokens
        # before the gating: DeepSpeed's top-2 adds its sampling noise to the logits in place
        aux = tutel_balance_loss(clean, logits, self.load_noise_std, self.k) if self.aux_kind == "tutel" else None
        if self.overflow == "priority" and drop:
            out = self._priority_gating(logits, cf, used_token)
        else:
            out = self._gating(logits, cf, used_token, drop, random_selection=self.use_rts and self.training)
        if aux is not None:
            out = (aux, *out[1:])
        indices = out[3]  # (k, tokens); a route evicted by the capacity limit has expert index -1
        self.dropped_fraction = (indices < 0).float().mean().detach()
        return out

    def _gating(self, logits, cf, used_token, drop, random_selection):
        """DeepSpeed's gating for this k. Everything random is for training only: evaluation must not depend
        on the RNG (random token selection, RSample noise, top-2's sampled second expert)."""
        if self.k == 1:
            return top1gating(logits, cf, self.min_capacity, used_token,
                              self.noisy_gate_policy if self.training else None, drop,
                              random_selection, self.ep_group, sparse_routes=True)
        if self.k == 2:
            return top2gating(logits, cf, self.min_capacity, drop, self.ep_group,
                              self.top2_2nd_expert_sampling and self.training, sparse_routes=True)
        return topkgating(logits, self.k, cf, self.min_capacity, drop, self.ep_group, sparse_routes=True)

    def _priority_gating(self, logits, cf, used_token):
        """DeepSpeed's gating with no capacity limit (same experts, loss and counts), then the capacity
        applied by `_keep_by_priority`, the priority of a token being the gate probability of its first
        choice (its top score, except under RSample noise). The output keeps DeepSpeed's conventions: slots
        numbered as its gate for this k numbers them, a dropped route has index -1, location 0 and gate 0;
        with k > 1 the kept routes of a token whose other route was dropped are renormalised over the kept
        ones. Nothing over capacity: exactly DeepSpeed's output."""
        probs = F.softmax(logits, dim=1)
        num_experts = probs.shape[1]
        per_token = 1 if self.k == 1 else self.k          # the capacity multiplier DeepSpeed's gate uses
        capacity = _capacity(probs, torch.tensor(cf * per_token), torch.tensor(self.min_capacity))
        # a capacity factor that fits every route: DeepSpeed then drops nothing (and needs no collective)
        unlimited = 2.0 * num_experts
        l_aux, _, _, indices, _, gates, counts = self._gating(logits.clone(), unlimited, used_token, drop=True,
                                                              random_selection=False)
        first = indices[0].long().clamp(min=0)
        priority = probs.gather(1, first.unsqueeze(1)).squeeze(1).detach()
        keep = _keep_by_priority(indices, priority, num_experts, capacity)
        routed = indices >= 0
        # no branch on whether anything overflowed (that would sync with the device): with every route kept,
        # each step below reproduces DeepSpeed's values exactly
        new_indices = torch.where(keep, indices, torch.full_like(indices, -1))
        new_locations = _slot_locations(new_indices, num_experts, rank_major=self.k <= 2)
        kept_gates = gates * keep
        if self.k > 1:
            lost = (routed & ~keep).any(0, keepdim=True)
            denom = kept_gates.sum(0, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
            kept_gates = torch.where(lost, kept_gates / denom, kept_gates)
        return l_aux, capacity, num_experts, new_indices, new_locations, kept_gates, counts


class LinearRouter(_Router):
    """DeepSpeed's top-k gate: logits = x W (its `wg` weight)."""

    def logits(self, x):
        return F.linear(x, self.wg.weight.to(x.dtype)).float()


class CosineRouter(_Router):
    """Cosine top-k router: project tokens to a small space, compare with one learned vector per expert.

    logits = scale * cos(P x, e_j), with a learned scale exp(t) clamped at 1/min_temperature so the
    softmax cannot become arbitrarily sharp. Defaults as Tutel's cosine_top gate (tutel/gates/cosine_top.py),
    which the reference uses: a 256-d projection (`model.*.router_dim`) with bias, expert vectors drawn from
    N(0, 0.01^2), t = log 2, clamp at log 100; Tutel's training noise is added to these scaled logits (`_Router.forward`).
    """

    def __init__(self, dim: int, cfg: MoEConfig, init_temperature: float = 0.5, min_temperature: float = 0.01,
                 init_std: float = 0.01):
        super().__init__(dim, cfg)
        proj_dim = cfg.router_dim
        del self.wg  # the linear gate's weight is not used; keep it out of the optimiser
        self.proj = nn.Linear(dim, proj_dim)
        # one learned vector per expert; not named "*expert*": DeepSpeed files every state-dict key holding
        # that word as an expert weight when it checkpoints. Only their directions enter the logits, but their
        # length sets how fast the optimiser turns them: Tutel's small init makes them move quickly.
        self.centroids = nn.Parameter(torch.empty(cfg.num_experts, proj_dim))
        nn.init.normal_(self.centroids, std=init_std)
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))  # 1-d: DeepSpeed cannot broadcast 0-d
        self.max_log_scale = math.log(1.0 / min_temperature)

    def logits(self, x):
        # the 768 -> 256 projection is most of the router's cost: model dtype; its normalisation in fp32
        projected = F.linear(x, self.proj.weight.to(x.dtype), self.proj.bias.to(x.dtype))
        keys = F.normalize(self.centroids.float(), dim=-1)
        scale = self.log_scale.float().clamp(max=self.max_log_scale).exp()
        # scale * normalize(projected) @ keys.T, with its backward written out (model/cosine.py)
        return cosine_logits(projected.float(), keys, scale)          # (tokens, experts)


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

    def __init__(self, dim: int, expert: nn.Module, cfg: MoEConfig, name: str, shared_experts: bool = False):
        super().__init__()
        _check_options(cfg, name, shared_experts)
        self.name = name
        self.aux_weight = cfg.aux_weight
        self.num_experts = cfg.num_experts
        self.ep_size = cfg.ep_size
        self.shared_experts = shared_experts
        self.moe = MoE(dim, expert, num_experts=cfg.num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                       min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens,
                       noisy_gate_policy=_deepspeed_noise(cfg))
        # DeepSpeed's MoE takes no gate argument: swap the gate it built; and its layer for ours (same experts,
        # all-to-all and parameter names; fewer copies and one batched matmul per projection: moe_dispatch.py)
        self.moe.deepspeed_moe = GroupedMOELayer.replacing(self.moe.deepspeed_moe)
        self.moe.deepspeed_moe.gate = ROUTERS[cfg.router](dim, cfg)
        if shared_experts:
            # the reference's experts: every slot of the layer runs one module (one weight set). The module
            # list holds it num_experts times; parameters() and named_parameters() list it once, state_dict()
            # (and so DeepSpeed's per-expert checkpoint files) once per slot, with equal values.
            experts = self.local_experts
            for i in range(1, len(experts)):
                experts[i] = experts[0]
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Shared experts load every slot's copy into the one module, so the last slot would silently win:
        # refuse a state dict whose slots differ (e.g. one saved with distinct experts).
        if self.shared_experts:
            head = f"{prefix}moe.deepspeed_moe.experts{EXPERT_KEY}"
            first: dict[str, tuple[str, torch.Tensor]] = {}
            for key, value in state_dict.items():
                if key.startswith(head):
                    rest = key[len(head):].partition(".")[2]
                    if rest not in first:
                        first[rest] = (key, value)
                    elif not torch.equal(first[rest][1], value):
                        error_msgs.append(f"{self.name}: this layer's experts share one weight set, but the state "
                                          f"dict holds different {first[rest][0]} and {key} (saved with distinct "
                                          f"experts?)")
                        break
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        keying on the global index makes ep_size=N hold the same experts as ep_size=1. Shared experts: the
        one module gets expert 0's weights.
        """
        n_local = len(self.local_experts)
        for i, expert in enumerate(self.local_experts):
            if self.shared_experts and i > 0:
                break
            global_index = ep_rank * n_local + i
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{self.name}/{global_index}".encode()))
            for p in expert.parameters():
                if p.dim() >= 2:
                    nn.init.xavier_uniform_(p, generator=gen)
                else:
                    nn.init.zeros_(p)


def _check_options(cfg: MoEConfig, name: str, shared_experts: bool) -> None:
    section = f"model.{name.split('.')[0]}" if name.startswith(("frm.", "ffm.")) else f"MoE layer {name!r}"
    if cfg.aux_loss not in ("switch", "tutel"):
        raise ValueError(f"{section}.aux_loss={cfg.aux_loss!r}: expected 'switch' or 'tutel'")
    if cfg.overflow not in ("random", "priority"):
        raise ValueError(f"{section}.overflow={cfg.overflow!r}: expected 'random' or 'priority'")
    if cfg.aux_loss == "tutel" and cfg.gate_noise_scale <= 0:
        raise ValueError(f"{section}.aux_loss=tutel needs {section}.gate_noise_scale > 0 (got "
                         f"{cfg.gate_noise_scale}): Tutel's load loss smooths with N(0, (gate_noise_scale / "
                         f"num_experts)^2)")
    if shared_experts and cfg.ep_size > 1:
        raise ValueError(f"{section}: shared experts (model.reference_mode) need {section}.ep_size=1, got "
                         f"{cfg.ep_size}: each expert-parallel rank would hold its own copy of the shared weights "
                         f"and the copies would drift apart")


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


# DeepSpeed names a local expert `...deepspeed_experts.<local index>...`; engine/ckpt.py maps it to the global
# index checkpoints use.
EXPERT_KEY = ".deepspeed_experts."
