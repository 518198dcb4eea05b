"""Our forward for DeepSpeed's MoE layer: its gate, capacity and all-to-all, with fewer copies around them.

DeepSpeed 0.19.8's `MOELayer.forward` gathers the routed tokens from a zero-padded copy of the input, runs the
local experts as a Python loop of small GEMMs joined by `cat`, and gathers the results back from a zero-padded
copy of the output. On CPU those copies cost more than the routing itself (bench/RESULTS.md). `GroupedMOELayer`
changes three things and keeps the rest (the gate call, the capacity, `_AllToAll` for ep_size > 1, the
per-expert parameters and so the checkpoint layout):

- dispatch (top-1): one gather fills the (E * C, D) slot buffer: each slot its token, an empty slot a copy of
  token 0 that nothing reads (DeepSpeed: a zeroed buffer, written where tokens go), so no buffer is zeroed;
- experts: when they are `Expert`s, the local experts run as two `baddbmm`s over their weights stacked in
  forward (E_local, H, D) - per slot exactly the `addmm` of each expert's `nn.Linear`;
- combine (top-1): one gather from the expert output, times the gate in fp32 as DeepSpeed's; a dropped token
  reads slot 0 with its gate forced to 0, where DeepSpeed reads a zero row appended to a copy of the output.
Dispatch and combine are autograd functions so that the backward also makes one copy each way: a dropped
token's zero gradient is read from an empty slot where one must exist (more slots than tokens, token-wise
experts), and the gate's gradient, a dot product per slot, is summed in cache-sized blocks on CPU.

Under glibc's default allocator every (tokens, D) tensor allocated on CPU costs a fresh mmap and its page faults
(~30 ms at the paper's shapes, more than the copy itself), so the count of such tensors is what these functions
cut; the trainer now keeps freed blocks on CPUs instead (train.malloc, engine/malloc.py), which removes most of
that cost, and fewer full passes over them (no zero fill) is what is left to save.

The output equals DeepSpeed's own forward for every input (tests/test_moe_speed.py), except that a dropped
token's output is 0 x (slot 0's output) rather than 0 x 0, and an empty slot's zero gradient reaches the experts'
weights as 0 x (what token 0 makes there) rather than 0 x (what zeros make): they differ only where those are not
finite (and then the loss is not finite either);
gradients equal it in fp32 up to the summation order of the gate's dot product (in bf16 the combine's
backward scales the gradient in bf16, where DeepSpeed's runs in fp32: equal to bf16 rounding). k > 1 uses
DeepSpeed's own encode/decode (several routes per token, which its gather sums in its order).
Host syncs: none of our own; `int(capacity)` reads a host tensor when tokens are dropped (DeepSpeed computes
it from shapes), and the device's largest expert count when they are not (drop_tokens=False: one per layer).
"""
from __future__ import annotations

import torch
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll, _route_slots, _sparse_decode, _sparse_encode
from deepspeed.utils import groups
from torch import nn


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


class GroupedMOELayer(MOELayer):
    """`MOELayer` with the forward described in the module docstring; built from DeepSpeed's layer."""

    @classmethod
    def replacing(cls, layer: MOELayer) -> GroupedMOELayer:
        return cls(layer.gate, layer.experts, layer.ep_group_name, layer.ep_size, layer.num_local_experts)

    def forward(self, *inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        if groups.mpu is not None or self.use_tutel:   # tensor-parallel and Tutel paths: DeepSpeed's own
            return super().forward(*inputs, **kwargs)
        x = inputs[0]
        used_token = inputs[1] if len(inputs) > 1 else None
        dim = x.shape[-1]
        tokens_sd = x.reshape(-1, dim)
        self.l_aux, capacity, num_experts, indices_ks, locations_ks, gates_ks, self.exp_counts = self.gate(
            tokens_sd, used_token, True, False)
        # a host tensor with drop_tokens (no sync); without, a device count the buffers' shape needs
        slots_per_expert = int(capacity)
        slots_ks = _route_slots(indices_ks, locations_ks, num_experts, slots_per_expert)  # dropped: E * C
        # top-1: the token each slot holds, for the dispatch and for the combine's backward (made once)
        token_n = _slot_tokens(slots_ks[0], num_experts * slots_per_expert) if slots_ks.shape[0] == 1 else None
        dispatched_ecd = _dispatch(tokens_sd, slots_ks, token_n, num_experts, slots_per_expert,
                                   token_wise=_all_expert_mlps(self.experts.deepspeed_experts))
        if self.ep_size > 1:
            dispatched_ecd = _AllToAll.apply(self.ep_group, dispatched_ecd)
        # after the all-to-all: (ep, E_local, C, D), this rank's experts' slots from every rank of the group
        out = run_experts(self.experts.deepspeed_experts,
                          dispatched_ecd.reshape(self.ep_size, self.num_local_experts, -1, dim))
        out_ecd = out.reshape(num_experts, -1, dim)
        if self.ep_size > 1:
            out_ecd = _AllToAll.apply(self.ep_group, out_ecd)
        combined_sd = _combine(out_ecd.reshape(-1, dim), slots_ks, token_n, indices_ks, gates_ks)
        return combined_sd.reshape(x.shape)


def _dispatch(tokens_sd: torch.Tensor, slots_ks: torch.Tensor, token_n: torch.Tensor | None, num_experts: int,
              capacity: int, token_wise: bool) -> torch.Tensor:
    """Tokens into their expert slots, (E, C, D). Top-k > 1: DeepSpeed's (empty slots hold zeros); top-1: an empty
    slot holds a copy of token 0 (see `_DispatchTop1`). token_wise: the experts act on each slot alone."""
    if slots_ks.shape[0] > 1:
        return _sparse_encode(tokens_sd, slots_ks, num_experts, capacity)
    slot_s = slots_ks[0]
    num_slots = num_experts * capacity
    # Where each token reads its gradient back from. A dropped token's is 0; with more slots than tokens a
    # dropped token leaves an empty slot behind, whose gradient is exactly 0 when the experts are token-wise
    # (nothing reads its output): reading it there saves a masked pass over every token's gradient.
    read_s = _empty_slot_for_dropped(slot_s, num_slots) if token_wise and num_slots >= slot_s.shape[0] else None
    slots_nd = _DispatchTop1.apply(tokens_sd, slot_s, token_n, read_s)
    return slots_nd.view(num_experts, capacity, tokens_sd.shape[1])


def _empty_slot_for_dropped(slot_s: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(S,) each token's slot, a dropped token's (slot N) replaced by the first empty slot (device ops only: with
    N >= S slots one exists whenever a token is dropped)."""
    occupied_n = torch.zeros(num_slots + 1, dtype=torch.bool, device=slot_s.device).index_fill_(0, slot_s, True)
    first_empty = (~occupied_n[:num_slots]).int().argmax()
    return torch.where(slot_s < num_slots, slot_s, first_empty)


def _slot_tokens(slot_s: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(N,) the token each slot holds, from each token's slot (S,) (N = dropped); an empty slot: token 0."""
    token_n = slot_s.new_zeros(num_slots + 1)
    token_n.index_copy_(0, slot_s, torch.arange(slot_s.shape[0], device=slot_s.device, dtype=slot_s.dtype))
    return token_n[:num_slots]      # row N, written by every dropped token, is no slot


def _combine(out_nd: torch.Tensor, slots_ks: torch.Tensor, token_n: torch.Tensor | None, indices_ks: torch.Tensor,
             gates_ks: torch.Tensor) -> torch.Tensor:
    """Each token's gate-weighted expert output, (S, D), in the output dtype; DeepSpeed's product in fp32."""
    if slots_ks.shape[0] > 1:
        return _sparse_decode(out_nd, slots_ks, gates_ks, slots_ks.shape[1])
    kept_s = indices_ks[0] >= 0
    return _CombineTop1.apply(out_nd, slots_ks[0], token_n, gates_ks[0] * kept_s)


class _DispatchTop1(torch.autograd.Function):
    """(S, D) tokens -> (N, D) slots: slot n holds its token, an empty slot token 0 (DeepSpeed's: zeros), as one
    gather with no zeroed buffer to fill first. Nothing reads an empty slot's output (the combine gives it a zero
    gradient), so what it holds reaches no weight gradient (x 0) and no token; a dropped token (slot N) gets a
    zero gradient: read from an empty slot (`read_s`, see `_dispatch`), else masked. One copy each way;
    autograd's version would add a padded gradient copy."""

    @staticmethod
    def forward(ctx, tokens_sd, slot_s, token_n, read_s):
        ctx.save_for_backward(slot_s, read_s)
        ctx.num_slots = token_n.shape[0]
        return tokens_sd.index_select(0, token_n)

    @staticmethod
    def backward(ctx, grad_nd):
        slot_s, read_s = ctx.saved_tensors
        if read_s is not None:
            return grad_nd.index_select(0, read_s), None, None, None
        grad_sd = grad_nd.index_select(0, slot_s.clamp(max=ctx.num_slots - 1))
        return grad_sd.masked_fill_((slot_s == ctx.num_slots).unsqueeze(1), 0), None, None, None


class _CombineTop1(torch.autograd.Function):
    """(N, D) expert outputs -> (S, D): gate[s] x out[slot[s]], the product in the gate's fp32 as DeepSpeed's,
    rounded to the output dtype. A dropped token (slot N) reads slot 0; the caller sets its gate to 0."""

    @staticmethod
    def forward(ctx, out_nd, slot_s, token_n, gate_s):
        num_slots = out_nd.shape[0]
        read_s = torch.where(slot_s < num_slots, slot_s, 0)
        ctx.save_for_backward(out_nd, slot_s, token_n, gate_s)
        product_sd = out_nd.index_select(0, read_s).to(gate_s.dtype).mul_(gate_s.unsqueeze(1))
        return product_sd.to(out_nd.dtype)        # in fp32, .to() returns the same tensor: no copies

    @staticmethod
    def backward(ctx, grad_sd):
        out_nd, slot_s, token_n, gate_s = ctx.saved_tensors
        num_slots = out_nd.shape[0]
        # the token gradients in slot order, then x each slot's gate: 0 for an empty slot (its gathered row, token
        # 0's, is only a placeholder: no zeroed buffer to fill). In the model dtype, not DeepSpeed's fp32: in bf16
        # its fp32 copies were a third of the layer's extra time.
        grad_nd = grad_sd.index_select(0, token_n)
        grad_gate_n = _row_dots(grad_nd, out_nd).to(gate_s.dtype)
        # a token reads its slot's; a dropped token (slot N) the appended 0; no token reads an empty slot's
        grad_gate_s = torch.cat([grad_gate_n, grad_gate_n.new_zeros(1)]).index_select(0, slot_s)
        gate_n = gate_s.new_zeros(num_slots + 1).index_copy_(0, slot_s, gate_s)[:num_slots]
        grad_nd.mul_(gate_n.to(grad_nd.dtype).unsqueeze(1))
        return grad_nd, None, None, grad_gate_s


def _row_dots(a_nd: torch.Tensor, b_nd: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """(N,) fp32 dot products of matching rows, without an (N, D) product tensor. On CUDA one einsum (a batched
    matmul); on CPU that bmm of N 1 x D x 1 products is 3x slower than a product and a sum, so those run on
    blocks of rows that stay in cache (in fp32: bf16 inputs are widened a block at a time)."""
    if a_nd.device.type != "cpu":
        return torch.einsum("nd,nd->n", a_nd, b_nd).float()
    out_n = torch.empty(a_nd.shape[0], dtype=torch.float32, device=a_nd.device)
    for start in range(0, a_nd.shape[0], rows):
        block = slice(start, start + rows)
        torch.sum(a_nd[block].float() * b_nd[block].float(), dim=1, out=out_n[block])
    return out_n


def _all_expert_mlps(experts: nn.ModuleList) -> bool:
    """Every expert is an `Expert`: token-wise (each slot alone) and with weights that stack for batched matmuls."""
    return all(isinstance(e, Expert) for e in experts)


def run_experts(experts: nn.ModuleList, x_gecd: torch.Tensor) -> torch.Tensor:
    """The local experts on their slots: x (ep, E_local, C, D) -> (ep, E_local, C, D)."""
    if not _all_expert_mlps(experts):
        return _loop(experts, x_gecd)
    ep, num_local, capacity, dim = x_gecd.shape
    x_ecd = x_gecd.transpose(0, 1).reshape(num_local, ep * capacity, dim)   # a view when ep == 1
    y_ecd = grouped_expert_forward(experts, x_ecd)
    return y_ecd.view(num_local, ep, capacity, dim).transpose(0, 1)


def grouped_expert_forward(experts: nn.ModuleList, x_ecd: torch.Tensor) -> torch.Tensor:
    """`Expert.forward` of expert e on x[e] for every e, as two batched matmuls.

    The weights are stacked on every call rather than stored stacked, so parameters, optimizer groups and
    checkpoints stay per expert (`deepspeed_experts.<i>.fc1.weight`); the stack copies 2 E H D numbers per
    forward, which bench/moe.py measures against the GEMMs it batches. baddbmm(bias, x, W^T) adds the bias
    as nn.Linear's addmm does, so each slot's result is the loop's to the bit (tested).
    """
    first = experts[0]
    if all(e is first for e in experts):      # shared experts: one weight set, one GEMM over every slot
        return first(x_ecd.reshape(-1, x_ecd.shape[-1])).view_as(x_ecd)
    w1_ehd = torch.stack([e.fc1.weight for e in experts])
    b1_eh = torch.stack([e.fc1.bias for e in experts])
    w2_edh = torch.stack([e.fc2.weight for e in experts])
    b2_ed = torch.stack([e.fc2.bias for e in experts])
    h_ech = _GroupedLinear.apply(x_ecd, w1_ehd, b1_eh)
    h_ech = first.drop(h_ech)                                   # per element, as in each expert
    y_ecd = _GroupedLinear.apply(h_ech, w2_edh, b2_ed)
    return x_ecd + y_ecd if first.residual else y_ecd


class _GroupedLinear(torch.autograd.Function):
    """x (E, C, I), w (E, O, I), b (E, O) -> x[e] @ w[e]^T + b[e], each slice as nn.Linear computes it.

    Autograd through `baddbmm(b, x, w.transpose(1, 2))` would return w's gradient as the transpose of an (E, I, O)
    product: every expert's slice of it is then non-contiguous, and autograd copies each one into a new tensor
    before it becomes the parameter's .grad (at 32 experts ~30 ms a step on the 2-core CPU). Here it is made as
    nn.Linear's is, grad^T @ x per expert, already in w's layout, so each slice is kept as it is."""

    @staticmethod
    def forward(ctx, x_eci, w_eoi, b_eo):
        ctx.save_for_backward(x_eci, w_eoi)
        return torch.baddbmm(b_eo.unsqueeze(1), x_eci, w_eoi.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_eco):
        x_eci, w_eoi = ctx.saved_tensors
        grad_x = torch.bmm(grad_eco, w_eoi) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad_eco.transpose(1, 2), x_eci) if ctx.needs_input_grad[1] else None
        grad_b = grad_eco.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _loop(experts: nn.ModuleList, x_gecd: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's `Experts.forward`: expert i on slice i of dim 1."""
    outs = []
    for chunk, expert in zip(x_gecd.chunk(len(experts), dim=1), experts):
        out = expert(chunk)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs, dim=1)
