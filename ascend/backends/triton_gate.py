"""Triton kernel for V4's scored expert routing (`model.kernels.gate_topk` without a hash table) in one launch.

The reference is four kernels on a decode step even after inductor's fusion: the scores and their biased choice,
torch.topk's radix select, its sort of the k picks, then the gather and normalisation of the weights (about 14 us
per routed layer at batch 1 on an H200, docs/performance.md). Here one program per token holds its E logits in
registers and picks the k experts by k rounds of argmax: k is 6 to 8 and E a few hundred for V4, so k reductions
of one row cost less than one launch.

Numerics follow the reference up to float32 rounding: softplus as torch computes it (x above 20 passes through,
else log1p(exp(x)), `_softplus`), IEEE square root and division; exp and log are Triton's (a few ulps). The picks
come in descending order of score + bias, as torch.topk returns them, with ties going to the lowest expert id
(torch.topk leaves tie order to the implementation). Hash layers (tid2eid) stay on the reference, which inductor
fuses into one kernel with its neighbours.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (importing triton_common also applies its fix to Triton 3.6's CPU interpreter)
from ascend.backends.triton_common import after_previous_kernel, launch_options


@triton.jit
def _softplus(z):
    """torch's softplus (threshold 20): z above it as is, else log1p(exp(z)), where log1p(u) is taken as
    log(1 + u) * u / ((1 + u) - 1), which cancels the rounding of 1 + u (Goldberg's formula; plain log(1 + u) would
    lose all of a tiny u, the scores of strongly negative logits)."""
    u = tl.exp(z)
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * tl.math.div_rn(u, w - 1.0))
    return tl.where(z > 20.0, z, log1p)


@triton.jit
def _gate_topk_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, E, route_scale, s_row,
                      K: tl.constexpr, K_P2: tl.constexpr, E_P2: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_P2)
    e_ok = e < E
    z = tl.load(logits_ptr + row * s_row + e, mask=e_ok, other=0.0).to(tl.float32)
    score = tl.math.sqrt_rn(_softplus(z))
    choice = score
    if bias_ptr is not None:
        choice += tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    # NaN choices rank lowest, with -inf ones: whatever the logits, the k picks are distinct ids below E (an id
    # past E would make the expert kernels read outside the weights; a NaN score still gives a NaN weight)
    choice = tl.where(e_ok & (choice == choice), choice, float("-inf"))
    avail = e_ok
    slot = tl.arange(0, K_P2)
    picked = tl.zeros([K_P2], tl.int32)
    weight = tl.zeros([K_P2], tl.float32)
    for j in tl.static_range(K):
        best = tl.max(tl.where(avail, choice, float("-inf")), 0)
        first = tl.min(tl.where(avail & (choice == best), e, E_P2), 0)     # the lowest id among the largest
        picked = tl.where(slot == j, first, picked)
        weight = tl.where(slot == j, tl.sum(tl.where(e == first, score, 0.0), 0), weight)
        avail = avail & (e != first)
    weight = tl.math.div_rn(weight, tl.zeros([K_P2], tl.float32) + tl.sum(weight, 0)) * route_scale
    tl.store(w_ptr + row * K + slot, weight, mask=slot < K)
    tl.store(idx_ptr + row * K + slot, picked.to(tl.int64), mask=slot < K)


def gate_topk(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
              num_warps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] (float32), bias [E] or None -> (weights float32 [N, topk], expert ids int64 [N, topk]), as
    `model.kernels.gate_topk` without tid2eid."""
    flat = logits.reshape(-1, logits.size(-1))
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    n, n_experts = flat.shape
    assert 0 < topk <= n_experts
    bias = None if bias is None else bias.contiguous()
    weights = torch.empty(n, topk, dtype=torch.float32, device=logits.device)
    indices = torch.empty(n, topk, dtype=torch.int64, device=logits.device)
    if n:
        _gate_topk_kernel[(n,)](flat, bias, weights, indices, n_experts, float(route_scale), flat.stride(0),
                                K=topk, K_P2=triton.next_power_of_2(topk), E_P2=triton.next_power_of_2(n_experts),
                                num_warps=num_warps, **launch_options(flat.device))
    return weights.view(*logits.shape[:-1], topk), indices.view(*logits.shape[:-1], topk)
