"""GroupedMOELayer (moe_dispatch.py) against what it replaces: DeepSpeed's expert loop and its own forward.

Shapes are kept just above torch's small-matrix threshold for CPU bmm (m * n * k >= 400), below which bmm
takes a naive kernel whose rounding differs from addmm's; the bench's shapes are far above it.
"""
import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import MOELayer

from mfrnet_ds.config import FRMConfig
from mfrnet_ds.model.moe import Expert, SparseMoE
from mfrnet_ds.model.moe_dispatch import _loop, run_experts

DIM, HIDDEN = 32, 24


def layer(shared=False, dtype=torch.float32, **kw) -> SparseMoE:
    cfg = FRMConfig(**{**dict(num_experts=4, gate_noise="normal", min_capacity=1, dropout=0.0,
                              capacity_factor=0.5), **kw})
    torch.manual_seed(0)
    moe = SparseMoE(DIM, Expert(DIM, HIDDEN, 0.0, residual=True), cfg, "frm.0", shared_experts=shared)
    moe.init_experts(seed=3)
    with torch.no_grad():     # non-zero biases, so that a bias added in the wrong place shows
        for p in moe.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return moe.to(dtype).train()


def forward_backward(fn, module, x, seed=7):
    """fn(x) under a fixed seed; loss = a fixed weighting of the output; returns output and every grad."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(x)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).float().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Equal up to rounding: every difference within rel x the largest magnitude (sums that cancel make an
    element-wise relative tolerance meaningless near zero)."""
    return (a.float() - b.float()).abs().max().item() <= rel * b.float().abs().max().item()


@pytest.mark.parametrize("ep", [1, 2])
def test_grouped_experts_equal_the_loop_outputs_and_gradients(ep):
    """Distinct experts: every slot's output and every parameter's gradient equal DeepSpeed's loop to the bit
    (baddbmm adds the bias as nn.Linear's addmm does). ep=2: the layout after the all-to-all."""
    moe = layer()
    experts = moe.local_experts
    x = torch.randn(ep, len(experts), 40, DIM, generator=torch.Generator().manual_seed(1))
    want = forward_backward(lambda t: _loop(experts, t), experts, x)
    got = forward_backward(lambda t: run_experts(experts, t), experts, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[2].keys() == got[2].keys() and len(want[2]) == 4 * len(experts)
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    # the stacked weights' gradient is handed to the experts as slices of one tensor, not copied slice by slice
    for weight in ("fc1", "fc2"):
        storages = {getattr(e, weight).weight.grad.untyped_storage().data_ptr() for e in experts}
        assert len(storages) == 1, weight


def test_shared_experts_grouped_equal_the_loop():
    """Shared experts run as one GEMM over every slot: outputs equal; the one weight set's gradient is summed
    over all slots at once instead of slot by slot, so it matches the loop's up to fp32 summation order."""
    moe = layer(shared=True)
    experts = moe.local_experts
    x = torch.randn(1, len(experts), 40, DIM, generator=torch.Generator().manual_seed(1))
    want = forward_backward(lambda t: _loop(experts, t), experts, x)
    got = forward_backward(lambda t: run_experts(experts, t), experts, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name in want[2]:
        assert torch.allclose(got[2][name], want[2][name], rtol=1e-5, atol=1e-5), name


def test_grouped_dropout_is_per_element():
    """Dropout between the projections drops single hidden units of single slots, as each expert's own
    nn.Dropout does: with identity projections the output is 0 or x / (1 - p) element by element."""
    experts = torch.nn.ModuleList([Expert(DIM, DIM, 0.5, residual=False) for _ in range(3)])
    with torch.no_grad():
        for e in experts:
            for fc in (e.fc1, e.fc2):
                fc.weight.copy_(torch.eye(DIM))
                fc.bias.zero_()
    x = torch.rand(1, 3, 40, DIM, generator=torch.Generator().manual_seed(1)) + 1.0   # no zeros
    torch.manual_seed(0)
    y = run_experts(experts, x)
    kept = y != 0
    assert torch.allclose(y[kept], 2 * x[kept])
    assert 0.4 < kept.float().mean().item() < 0.6
    assert kept.any(-1).all() and (~kept).any(-1).all()        # every slot keeps some units and drops some
    assert torch.equal(run_experts(experts.eval(), x), x)      # evaluation: no dropout


@pytest.mark.parametrize("router, k", [("linear", 1), ("cosine", 1), ("cosine", 2)])
@pytest.mark.parametrize("dtype, capacity_factor", [(torch.float32, 0.5), (torch.bfloat16, 0.5), (torch.float32, 1.0)])
def test_layer_output_equals_deepspeed_forward(router, k, dtype, capacity_factor):
    """Our forward against DeepSpeed's own MOELayer.forward on the same module, gate and RNG, with tokens over
    capacity: equal outputs (fp32 and bf16). Gradients: top-1's gate gradient is a row-wise dot product summed
    in blocks (DeepSpeed: in one einsum), equal up to summation order; top-2 uses DeepSpeed's encode/decode
    (fp32: equal to the bit). Capacity 0.5: fewer slots than tokens, a dropped token's gradient is masked to 0;
    1.0: as many slots as tokens, so a dropped token leaves an empty slot and reads its zero gradient there
    (dtype-blind; in bf16 an expert's bias gradient sums 80 slots and cancels to within bf16 noise of both)."""
    moe = layer(router=router, top_k=k, dtype=dtype, capacity_factor=capacity_factor)
    # 320 tokens: 40 slots per expert, the row count the expert-loop test checks bmm against addmm at
    x = torch.randn(2, 160, DIM, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = forward_backward(lambda t: MOELayer.forward(moe.moe.deepspeed_moe, t, None), moe, x)
    got = forward_backward(moe, moe, x)
    assert moe.dropped_fraction.item() > 0
    assert torch.equal(got[0], want[0])
    # of the tensor's largest value. bf16: our combine's backward runs in bf16 (DeepSpeed's in fp32), each
    # element within a bf16 rounding or two; a bias gradient sums 40 such slots in bf16, so a few percent
    rel = 1e-5 if dtype == torch.float32 else 6e-2
    assert close(got[1], want[1], rel)
    assert want[2].keys() == got[2].keys()
    for name in want[2]:
        assert close(got[2][name], want[2][name], rel), name
        if k == 2 and dtype == torch.float32:
            assert torch.equal(got[2][name], want[2][name]), name


def test_routers_project_in_the_model_dtype():
    """fp32: the logits are the fp32 formula (linear: to the bit; cosine: to fp32 rounding, its last step is
    model/cosine.py's). bf16: the projection runs in bf16 (no fp32 copy of the tokens), its normalisation and the
    logits in fp32."""
    x = torch.randn(50, DIM, generator=torch.Generator().manual_seed(4))
    for router in ("linear", "cosine"):
        r = layer(router=router).router
        if router == "linear":
            want = F.linear(x, r.wg.weight)
        else:
            q = F.normalize(F.linear(x, r.proj.weight, r.proj.bias), dim=-1)
            scale = r.log_scale.clamp(max=r.max_log_scale).exp()
            want = scale * (q @ F.normalize(r.centroids, dim=-1).t())
        assert same(r.logits(x), want, router), router
        r = r.to(torch.bfloat16)
        xb = x.bfloat16()
        if router == "linear":
            want = F.linear(xb, r.wg.weight).float()
        else:
            q = F.normalize(F.linear(xb, r.proj.weight, r.proj.bias).float(), dim=-1)
            scale = r.log_scale.float().clamp(max=r.max_log_scale).exp()
            want = scale * (q @ F.normalize(r.centroids.float(), dim=-1).t())
        got = r.logits(xb)
        assert got.dtype == torch.float32 and same(got, want, router), router


def same(got, want, router):
    return torch.equal(got, want) if router == "linear" else torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cosine_logits_backward_is_the_derivative():
    """model/cosine.py's written-out backward: gradcheck in float64, and equal to autograd through
    F.normalize (fp64: to 1e-12), for the projected tokens, the expert vectors and the scale."""
    from mfrnet_ds.model.cosine import cosine_logits
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(40, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    k = F.normalize(torch.randn(5, 12, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    scale = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cosine_logits, (p, k, scale))
    g = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((cosine_logits(p, k, scale) * g).sum(), (p, k, scale))
    want = torch.autograd.grad((scale * (F.normalize(p, dim=-1) @ k.t()) * g).sum(), (p, k, scale))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
