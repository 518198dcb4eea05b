"""Cosine router logits, scale * cos(p_s, k_e), with a backward written out (the cosine router's last step).

Autograd through `F.normalize(p) @ k.T` makes and walks several (tokens, router_dim) tensors each way (the norm's
quotient, its gradient, the division's two gradients). With u = p k^T (k: unit expert vectors) and n = |p|:

    logits = scale * u / n
    dL/du  = scale * G / n                              (G = dL/dlogits, tokens x experts)
    dL/dp  = (dL/du) k - (sum_e dL/du * u) / n^2 * p    (the second term: through n; dn/dp = p / n)
    dL/dk  = (dL/du)^T p
    dL/dscale = sum G * u / n

so the backward is one small GEMM and one fused pass for dL/dp, one small GEMM for dL/dk: on the 2-core CPU
~20 ms instead of ~45 ms per step at the paper's shapes (24,768 tokens, 256-d). Equal to autograd's result up to
fp32 rounding (tests/test_moe_speed.py). `n` is clamped at 1e-12 as F.normalize's.
"""
from __future__ import annotations

import torch


class CosineLogits(torch.autograd.Function):
    """(S, P) projected tokens, (E, P) unit expert vectors, (1,) scale -> (S, E) logits, all fp32."""

    @staticmethod
    def forward(ctx, p_sp, k_ep, scale):
        n_s1 = torch.linalg.vector_norm(p_sp, dim=1, keepdim=True).clamp_min_(1e-12)
        u_se = p_sp @ k_ep.t()
        ctx.save_for_backward(p_sp, k_ep, n_s1, u_se, scale)
        return u_se / n_s1 * scale

    @staticmethod
    def backward(ctx, grad_se):
        p_sp, k_ep, n_s1, u_se, scale = ctx.saved_tensors
        grad_u_se = grad_se * scale / n_s1
        grad_n_s1 = (grad_u_se * u_se).sum(1, keepdim=True) / n_s1        # minus dL/dn
        grad_p = torch.addcmul(grad_u_se @ k_ep, p_sp, grad_n_s1 / n_s1, value=-1.0)
        grad_k = grad_u_se.t() @ p_sp
        grad_scale = (grad_se * u_se / n_s1).sum().reshape(scale.shape)
        return grad_p, grad_k, grad_scale


def cosine_logits(p_sp: torch.Tensor, k_ep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return CosineLogits.apply(p_sp, k_ep, scale)
