"""Routing options of the MoE layers: Tutel's balance loss, batch-prioritised overflow, shared experts.

Expected values come from the rules (hand-worked on tiny cases), not from running the code twice.
"""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from mfrnet_ds.config import FRMConfig
from mfrnet_ds.model.moe import Expert, LinearRouter, SparseMoE, tutel_balance_loss

LN3 = math.log(3.0)
# softmax of these rows: [.75, .25], [.25, .75], [.75, .25], [.5, .5]
LOGITS_4x2 = torch.tensor([[LN3, 0.0], [0.0, LN3], [LN3, 0.0], [0.0, 0.0]])


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def cv2(values: list[float]) -> float:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var / (mean ** 2 + 1e-10)


def identity_router(cfg: FRMConfig) -> LinearRouter:
    """Linear router whose logits are the input itself (input width = number of experts)."""
    router = LinearRouter(cfg.num_experts, cfg)
    with torch.no_grad():
        router.wg.weight.copy_(torch.eye(cfg.num_experts))
    return router


def route(router, x, seed=0):
    torch.manual_seed(seed)
    return router(x, sparse_routes=True)


# ---- Tutel's load + importance loss --------------------------------------------------------------------

def test_tutel_loss_4_tokens_2_experts_by_hand():
    # importance = column sums of the probabilities = [2.25, 1.75]: mean 2, var (n-1) 0.125 -> cv2 = 1/32
    noisy = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.75, 0.25], [0.5, 0.5]])
    sigma = 0.5                                            # gate_noise 1 / 2 experts
    # k=1: threshold = largest noisy logit = [1, .5, .75, .5]; (p - t) / sigma per token:
    #   [-.5, -1.5], [-.5, .5], [0, -1], [0, 0]
    load = [phi(-.5) + phi(-.5) + phi(0) + phi(0), phi(-1.5) + phi(.5) + phi(-1) + phi(0)]
    assert load == pytest.approx([1.6170751, 1.4169249])
    want_k1 = (1 / 32 + cv2(load)) / 2
    assert want_k1 == pytest.approx(0.0199769, abs=1e-7)
    assert tutel_balance_loss(LOGITS_4x2, noisy, sigma, 1).item() == pytest.approx(want_k1, rel=1e-5)
    # k=2: threshold = second largest = [0, 0, .25, .5]; (p - t) / sigma: [1.5, .5], [.5, 1.5], [1, 0], [0, 0]
    load = [phi(1.5) + phi(.5) + phi(1) + phi(0), phi(.5) + phi(1.5) + phi(0) + phi(0)]
    want_k2 = (1 / 32 + cv2(load)) / 2
    assert want_k2 == pytest.approx(0.0193529, abs=1e-7)
    assert tutel_balance_loss(LOGITS_4x2, noisy, sigma, 2).item() == pytest.approx(want_k2, rel=1e-5)
    # differentiable in the logits (importance and load) and the noisy logits (threshold)
    a, b = LOGITS_4x2.clone().requires_grad_(), noisy.clone().requires_grad_()
    tutel_balance_loss(a, b, sigma, 1).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # a perfectly balanced batch costs nothing
    even = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert tutel_balance_loss(even, even, sigma, 1).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("training", [False, True])
def test_router_reports_tutel_or_switch_loss(training):
    base = dict(num_experts=2, top_k=1, min_capacity=1, drop_tokens=False, eval_drop_tokens=False,
                gate_noise="none", gate_noise_scale=1.0)
    tutel = identity_router(FRMConfig(aux_loss="tutel", **base)).train(training)
    # no noise: the threshold is each token's largest logit [ln3, ln3, ln3, 0]; sigma = 1 / 2
    z = [[(.75 - LN3) / .5, (.25 - LN3) / .5], [(.25 - LN3) / .5, (.75 - LN3) / .5],
         [(.75 - LN3) / .5, (.25 - LN3) / .5], [1.0, 1.0]]
    load = [sum(phi(row[e]) for row in z) for e in range(2)]
    want = (1 / 32 + cv2(load)) / 2
    assert want == pytest.approx(0.0216749, abs=1e-7)
    assert route(tutel, LOGITS_4x2)[0].item() == pytest.approx(want, rel=1e-5)
    # "switch" stays DeepSpeed's: E * sum(mean prob x fraction routed); the tie of token 3 goes to expert 0
    switch = identity_router(FRMConfig(aux_loss="switch", **base)).train(training)
    assert route(switch, LOGITS_4x2)[0].item() == pytest.approx(2 * (2.25 / 4 * 3 / 4 + 1.75 / 4 * 1 / 4))


# ---- batch-prioritised overflow ------------------------------------------------------------------------

# top-1, 2 experts, 8 tokens, capacity ceil(8 / 2 * 0.5) = 2. Gate probability of the chosen expert:
#   expert 0: tokens 0 (.731), 2 (.953), 3 (.881), 5 (.622), 7 (.982) -> keeps 7 and 2
#   expert 1: tokens 1 (.881), 4 (.731), 6 (.953)                     -> keeps 6 and 1
TOP1_X = torch.tensor([[1, 0], [0, 2], [3, 0], [2, 0], [0, 1], [.5, 0], [0, 3], [4, 0]])
TOP1_KEPT = [-1, 1, 0, -1, -1, -1, 1, 0]
TOP1_LOC = [0, 0, 0, 0, 0, 0, 1, 1]         # kept tokens numbered in token order within their expert


def top1_cfg(**kw):
    return FRMConfig(**{**dict(num_experts=2, top_k=1, capacity_factor=0.5, eval_capacity_factor=0.5,
                               min_capacity=1, drop_tokens=True, eval_drop_tokens=True, gate_noise="none"), **kw})


@pytest.mark.parametrize("training", [True, False])
def test_priority_top1_keeps_highest_gates(training):
    router = identity_router(top1_cfg(overflow="priority")).train(training)
    x = TOP1_X.float()
    probs = torch.softmax(x, dim=1)
    outs = [route(router, x, seed) for seed in (0, 1, 2)]
    for out in outs:
        _, capacity, experts, idx, loc, gates, counts = out
        assert int(capacity) == 2 and experts == 2
        assert idx.tolist() == [TOP1_KEPT] and loc.tolist() == [TOP1_LOC]
        kept = torch.tensor(TOP1_KEPT) >= 0
        chosen = probs.gather(1, x.argmax(1, keepdim=True)).squeeze(1)
        assert torch.allclose(gates[0], torch.where(kept, chosen, torch.zeros(())))
        assert counts.tolist() == [5, 3]         # before capacity
        assert router.dropped_fraction.item() == pytest.approx(4 / 8)
    # no RNG involved: any seed, same routing
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(outs[0][3:], out[3:]))
    # DeepSpeed's top-1 also keeps 2 per expert, but not by score (random while training; at evaluation
    # torch.topk's choice among equal mask entries, which is not token order either)
    other = identity_router(top1_cfg(overflow="random")).train(training)
    idx = route(other, x)[3][0]
    assert (idx == 0).sum() == 2 and (idx == 1).sum() == 2


def test_priority_top2_serves_first_choices_first():
    # 3 experts, 6 tokens, top-2 capacity ceil(6 / 3 * 0.5 * 2) = 2; evaluation: second choice = 2nd largest
    x = torch.tensor([[1, 0, 3], [2, 0, 1], [3, 0, .5], [4, 0, 2], [0, 3, 1], [.5, 2, 0]])
    top = torch.softmax(x, dim=1).max(1).values       # priority: each token's top gate
    assert top[2] > top[3] > top[4] > top[1]           # .884 > .867 > .844 > .665
    router = identity_router(FRMConfig(num_experts=3, top_k=2, eval_capacity_factor=0.5, min_capacity=1,
                                       eval_drop_tokens=True, gate_noise="none", overflow="priority")).eval()
    _, capacity, _, idx, loc, gates, _ = route(router, x)
    assert int(capacity) == 2
    # first choices: expert 0 gets tokens 1, 2, 3 -> keeps 2, 3 (first-come would keep 1, 2); expert 1: 4, 5;
    # expert 2: 0. Second choices: expert 0 (tokens 0, 5) is full; expert 2 has one slot left for tokens
    # 1, 2, 3, 4 -> token 2, the best.
    assert idx.tolist() == [[2, -1, 0, 0, 1, 1], [-1, -1, 2, -1, -1, -1]]
    assert loc.tolist() == [[0, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0]]  # second choices after the first ones
    # DeepSpeed's top-2 weights: normalised over the routes a token keeps
    g = math.exp(3) / (math.exp(3) + math.exp(.5))
    want = torch.tensor([[1, 0, g, 1, 1, 1], [0, 0, 1 - g, 0, 0, 0]])
    assert torch.allclose(gates, want, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_priority_equals_deepspeed_when_nothing_overflows(k, training):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(12, 16, generator=g)
    cfg = dict(num_experts=4, top_k=k, capacity_factor=4.0, eval_capacity_factor=4.0, min_capacity=1,
               drop_tokens=True, eval_drop_tokens=True, gate_noise="normal")
    random = LinearRouter(16, FRMConfig(overflow="random", **cfg)).train(training)
    priority = LinearRouter(16, FRMConfig(overflow="priority", **cfg)).train(training)
    priority.load_state_dict(random.state_dict())
    a, b = route(random, x, seed=5), route(priority, x, seed=5)
    assert (a[3] >= 0).all()                             # nothing dropped
    assert int(a[1]) == int(b[1]) and a[2] == b[2]
    for u, v in zip((a[0], *a[3:]), (b[0], *b[3:])):
        assert torch.equal(u, v)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_priority_routes_fit_and_deepspeed_dispatches_them(k):
    """Over capacity: every kept route has its own slot below capacity; a dropped route lost to better ones
    of its rank or to an expert already full; and DeepSpeed's layer output is sum(gate x chosen expert)."""
    moe = layer(False, router="linear", top_k=k, eval_capacity_factor=0.5, eval_drop_tokens=True,
                overflow="priority").eval()
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(k))
    flat = x.reshape(-1, 16)
    with torch.no_grad():
        _, capacity, E, idx, loc, gates, _ = moe.router(flat, sparse_routes=True)
        out = moe(x).reshape(-1, 16)
        capacity = int(capacity)
        assert (idx < 0).any()
        slots = [(int(e), int(c)) for e, c in zip(idx.flatten(), loc.flatten()) if e >= 0]
        assert len(set(slots)) == len(slots) and all(0 <= c < capacity for _, c in slots)
        # what each route would have chosen without the capacity limit
        logits = moe.router.logits(flat)
        probs = torch.softmax(logits, dim=1)
        wanted = torch.topk(probs, k, dim=1).indices.t()             # (k, tokens); no sampling at evaluation
        prio = probs.max(1).values
        kept = idx >= 0
        assert torch.equal(idx[kept].long(), wanted[kept])
        for r in range(k):
            for e in range(E):
                mine = wanted[r] == e
                lost, won = mine & ~kept[r], mine & kept[r]
                full = int((kept[:r] & (wanted[:r] == e)).sum()) + int(won.sum()) == capacity
                if lost.any():
                    assert full and (not won.any() or prio[lost].max() <= prio[won].min()), (r, e)
        want = torch.zeros_like(flat)
        for r in range(k):
            for s in range(flat.shape[0]):
                if idx[r, s] >= 0:
                    want[s] += gates[r, s] * moe.local_experts[int(idx[r, s])](flat[s:s + 1])[0]
        assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("overflow", ["random", "priority"])
def test_evaluation_routing_does_not_depend_on_rng(overflow):
    # top-2 included: DeepSpeed samples its second expert with Gumbel noise, which is for training only here
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3):
        router = LinearRouter(16, FRMConfig(num_experts=4, top_k=k, eval_capacity_factor=0.5, min_capacity=1,
                                            eval_drop_tokens=True, overflow=overflow)).eval()
        a, b = route(router, x, seed=1), route(router, x, seed=2)
        assert (a[3] < 0).any()                          # some routes over capacity
        for u, v in zip((a[0], *a[3:]), (b[0], *b[3:])):
            assert torch.equal(u, v), (k, overflow)


# ---- shared expert weights -----------------------------------------------------------------------------

def layer(shared: bool, **kw) -> SparseMoE:
    cfg = FRMConfig(**{**dict(num_experts=4, gate_noise="none", min_capacity=1, dropout=0.0), **kw})
    torch.manual_seed(0)
    moe = SparseMoE(16, Expert(16, 8, 0.0, residual=True), cfg, "frm.0", shared_experts=shared)
    moe.init_experts(seed=3)
    return moe


def test_shared_experts_share_one_weight_set():
    shared, distinct = layer(True), layer(False)
    experts = shared.local_experts
    assert len(experts) == 4 and all(e is experts[0] for e in experts)
    expert_params = [n for n, _ in shared.named_parameters() if ".deepspeed_experts." in n]
    assert sorted(expert_params) == sorted(f"moe.deepspeed_moe.experts.deepspeed_experts.0.{n}"
                                           for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    router = sum(p.numel() for p in shared.router.parameters())
    one = sum(p.numel() for p in experts[0].parameters())
    assert sum(p.numel() for p in shared.parameters()) == router + one
    assert sum(p.numel() for p in distinct.parameters()) == router + 4 * one
    # the one weight set is the default layer's expert 0; the default's experts all differ
    assert torch.equal(experts[0].fc1.weight, distinct.local_experts[0].fc1.weight)
    x = torch.randn(5, 16)
    with torch.no_grad():
        outs = [e(x) for e in experts]
        assert all(torch.equal(outs[0], o) for o in outs)
        outs = [e(x) for e in distinct.local_experts]
        assert all(not torch.allclose(outs[i], outs[j]) for i in range(4) for j in range(i + 1, 4))
        # every token, whichever expert it goes to, gets gate x the one expert's output (top-1, no drops)
        shared.eval()
        tokens = torch.randn(2, 6, 16)
        out = shared(tokens)
        gate = torch.softmax(shared.router.logits(tokens.reshape(-1, 16)), dim=1).max(1).values
        want = gate[:, None] * experts[0](tokens.reshape(-1, 16))
        assert torch.allclose(out.reshape(-1, 16), want, atol=1e-6)
        assert shared.expert_counts.sum() == 12


def test_shared_experts_rules():
    with pytest.raises(ValueError, match=r"model\.frm\.ep_size=1"):
        layer(True, ep_size=2)
    shared = layer(True)
    with pytest.raises(RuntimeError, match="share one weight set"):
        shared.load_state_dict(layer(False).state_dict())     # distinct experts cannot load into one
    shared.load_state_dict(layer(True).state_dict())


CHECKPOINT_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from mfrnet_ds.config import FRMConfig
    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.engine.optim import split_expert_groups
    from mfrnet_ds.model.moe import Expert, SparseMoE

    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    info = D.init_distributed()

    class Net(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            cfg = FRMConfig(num_experts=4, gate_noise="none", drop_tokens=False, min_capacity=1)
            self.moe = SparseMoE(16, Expert(16, 8, 0.0, residual=True), cfg, "frm.0", shared_experts=True)
            self.moe.init_experts(seed)
            self.head = torch.nn.Linear(16, 1)
            self.moe_layers = [self.moe]          # what D.initialize checks

        def forward(self, x):
            return self.head(self.moe(x)).pow(2).mean() + self.moe.aux_loss

    def engine_for(seed):
        net = Net(seed)
        opt = torch.optim.Adam(split_expert_groups([{"params": list(net.parameters()), "name": "all"}]), lr=1e-2)
        ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        return D.initialize(net, opt, None, ds, info), net

    engine, net = engine_for(0)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    start = net.moe.local_experts[0].fc1.weight.detach().clone()
    for _ in range(3):
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    trained = not torch.equal(start, net.moe.local_experts[0].fc1.weight)
    engine.save_checkpoint(str(out), tag="t")
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        want = engine(x).item()
    engine2, net2 = engine_for(1)
    differs_before = not torch.equal(net2.moe.local_experts[0].fc1.weight, net.moe.local_experts[0].fc1.weight)
    engine2.load_checkpoint(str(out), tag="t")
    got_sd = net2.state_dict()
    with torch.no_grad():
        got = engine2(x).item()
    print("RESULT " + json.dumps({
        "files": sorted(p.name for p in (out / "t").iterdir()),
        "params": len(list(net.parameters())), "trained": trained, "differs_before": differs_before,
        "still_shared": all(e is net2.moe.local_experts[0] for e in net2.moe.local_experts),
        "state_equal": saved.keys() == got_sd.keys() and all(torch.equal(saved[k], got_sd[k]) for k in saved),
        "loss_equal": want == got}))
''')


@pytest.mark.parametrize("stage", [0, 2])
def test_shared_experts_deepspeed_checkpoint_roundtrip(tmp_path, stage):
    """One process (a world of one on loopback, in a child so this one keeps no process group)."""
    script = tmp_path / "ckpt.py"
    script.write_text(CHECKPOINT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(stage)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert r["params"] == 4 + 4 + 2          # cosine router, the one expert, head: listed once
    assert r["trained"] and r["differs_before"] and r["still_shared"]
    assert r["state_equal"] and r["loss_equal"]
    # DeepSpeed writes one file per expert slot (equal contents) next to the non-expert file
    assert sum(f.startswith("layer_0_expert_") for f in r["files"]) == 4
    assert "mp_rank_00_model_states.pt" in r["files"]


# ---- every option combination trains -------------------------------------------------------------------

@pytest.mark.parametrize("router, k", [("cosine", 1), ("linear", 2), ("cosine", 3)])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("overflow", ["random", "priority"])
@pytest.mark.parametrize("aux", ["switch", "tutel"])
def test_forward_backward_every_combination(aux, overflow, shared, router, k):
    moe = layer(shared, router=router, top_k=k, aux_loss=aux, overflow=overflow, capacity_factor=0.5,
                gate_noise="normal").train()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = moe(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.isfinite(moe.aux_loss) and moe.aux_loss.item() >= 0
    assert moe.dropped_fraction.item() > 0                 # capacity 0.5: some routes over capacity
    (out.pow(2).mean() + moe.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    router_grads = [p.grad.abs().sum().item() for p in moe.router.parameters()]
    assert sum(router_grads) > 0
    moe.eval()
    with torch.no_grad():
        assert torch.isfinite(moe(x)).all()


def test_option_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model\.frm\.aux_loss=tutel needs model\.frm\.gate_noise_scale > 0"):
        layer(False, aux_loss="tutel", gate_noise_scale=0.0)
    with pytest.raises(ValueError, match=r"model\.frm\.overflow='first'"):
        layer(False, overflow="first")
