"""The fused-operator seam of the model: a `Kernels` table of callables with pure-PyTorch reference bodies.

Model modules never call a fused or device-specific operator directly; they call `kernels.<name>(...)` on the
`Kernels` object they were given (default `REFERENCE`). A backend (ascend/backends/npu.py, cuda.py) accelerates a
stage with `dataclasses.replace(REFERENCE, sparse_attn=my_sparse_attn, ...)` and must keep the signature and the
semantics written in each docstring below.

Rules every implementation keeps:

* batch-first shapes; every output shape depends only on input *shapes* and integer arguments, never on tensor
  values (top-k is a fixed size padded with -1), so a decode step can be graph-captured and exported;
* reductions and softmaxes run in float32; an output has the dtype stated in its docstring;
* inputs are not modified in place (except `compress_blocks`'s state, the compressor's carry, as documented).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import quant

Tensor = torch.Tensor

__all__ = ["Kernels", "REFERENCE", "rms_norm", "rope", "hadamard", "indexer_topk", "indexer_scores", "sum_scores",
           "select_topk", "sparse_attn", "sinkhorn", "hc_pre", "hc_post", "hc_head", "gate_topk", "f32_linear",
           "grouped_linear", "group_experts", "expert_matmul", "argmax", "pool_blocks", "chunk_blocks",
           "compress_blocks", "take_rows", "round_kv_entries", "rotate_index", "use_kernels"]


# ----------------------------------------------------------------------------------------------- norms, RoPE
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMS-normalise the last dim of `x` [..., D]: x / sqrt(mean(x^2) + eps), times `weight` [D] if given.

    Computed in float32 (the weight is cast to float32 too); returns x's dtype.
    """
    y = x.float()
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Interleaved rotary embedding on the LAST R = 2 * cos.size(-1) dims of `x`; the leading dims pass through.

    x: [B, S, D] or [B, S, H, D] (any dtype); cos, sin: [B, S, R/2] float32, the angle of each (even, odd) pair at
    each token's own position (see model/rope.py). Pair k of token (b, s), (x[2k], x[2k+1]) -> (x0*c - x1*s,
    x0*s + x1*c), c = cos[b, s, k], s = sin[b, s, k]; the tables broadcast over the head dim. `inverse=True`
    rotates by the negative angle (the conjugate), undoing a forward rotation. Float32 math; returns x's dtype.
    """
    r = 2 * cos.size(-1)
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if inverse:
        sin = -sin
    pairs = x[..., -r:].float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-r], rotated.to(x.dtype)), dim=-1)


def hadamard(x: Tensor) -> Tensor:
    """Normalised Walsh-Hadamard transform of the last dim D (a power of two): x @ H_D * D^-0.5, H_D the Sylvester
    matrix ([[H, H], [H, -H]]). Orthogonal and its own inverse. Float32 math; returns x's dtype."""
    d = x.size(-1)
    if d & (d - 1):
        raise ValueError(f"hadamard: last dim {d} is not a power of two")
    # butterfly: log2(d) stages of (a + b, a - b) on halves, no d x d matrix needed
    y = x.float()
    h = 1
    while h < d:
        y = y.unflatten(-1, (-1, 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * d ** -0.5).to(x.dtype)


# ----------------------------------------------------------------------------------------------- attention
_QUERY_BLOCK = 256                      # queries per gather in the reference sparse_attn


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, n_visible: Tensor, topk: int,
                 group: dist.ProcessGroup | None = None) -> Tensor:
    """Lightning-indexer selection of compressed entries.

    q: [B, S, H, Dk] indexer queries; k: [B, T, Dk] compressed indexer keys (T = cache capacity);
    weights: [B, S, H] per-head weights; n_visible: [B, S] integer, entries t < n_visible[b, s] are visible.
    score[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h] . k[b, t]) in float32; when `group` is given (tensor
    parallel: each rank holds some heads) the scores are summed over the group before selection.
    Returns int32 [B, S, topk]: the indices of the largest visible scores (order unspecified), -1 in every slot
    beyond the number of visible entries (and in all slots past T when topk > T). Among entries tied with the
    topk-th largest score the lowest indices win, so equal scores always select the same entries.
    """
    return select_topk(sum_scores(indexer_scores(q, k, weights, n_visible), group), topk)


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, n_visible: Tensor) -> Tensor:
    """`indexer_topk`'s scores of this rank's heads, float32 [B, S, T], -inf where t >= n_visible[b, s]."""
    keys_t = k.float().transpose(1, 2)
    scores = q.new_zeros(q.size(0), q.size(1), k.size(1), dtype=torch.float32)
    for h in range(q.size(2)):          # one head at a time: [B, S, T] live instead of [B, S, H, T]
        scores += weights[:, :, h, None].float() * torch.bmm(q[:, :, h].float(), keys_t).relu_()
    visible = torch.arange(k.size(1), device=k.device) < n_visible.unsqueeze(-1)
    return scores.masked_fill(~visible, float("-inf"))


def sum_scores(scores: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Indexer scores summed over the tensor-parallel `group` (each rank holds some heads), in place; -inf
    (invisible) stays -inf, as every rank masks the same entries."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(scores, group=group)
    return scores


def select_topk(scores: Tensor, topk: int) -> Tensor:
    """`indexer_topk`'s selection from float32 scores [..., T] (-inf: not visible): int32 [..., topk], the indices of
    the largest finite scores (order unspecified), ties at the topk-th score to the lowest indices, -1 in every other
    slot (past the finite ones, and past T when topk > T)."""
    n = min(topk, scores.size(-1))
    idx = topk_lowest_index(scores, n)
    idx = torch.where(scores.gather(-1, idx) == float("-inf"), -1, idx).int()
    if n < topk:
        idx = F.pad(idx, (0, topk - n), value=-1)
    return idx


def topk_lowest_index(scores: Tensor, n: int) -> Tensor:
    """Indices (int64, order unspecified) of the `n` largest `scores` along the last dim, ties broken by index.

    torch.topk breaks ties in an implementation-defined way that on CPU depends on the *other* values: swapping two
    scores that are both selected anyway can change which of several entries tied at the boundary is kept. The
    indexer's scores tie exactly whenever every head's ReLU is zero (score 0), so that choice must not depend on
    rounding elsewhere. Here everything above the n-th largest value is kept, then the lowest-index entries equal
    to it fill the remaining slots. Static shapes: two top-k passes and a cumulative sum.
    """
    kth = scores.topk(n, dim=-1).values[..., -1:]           # the n-th largest value (sorted descending)
    above = scores > kth
    tied = (scores == kth).int()                            # int32: ONNX CumSum takes no bool
    free = n - above.int().sum(-1, keepdim=True)            # slots left for the tied entries
    keep = above | ((tied > 0) & (tied.cumsum(-1) <= free))
    rank = torch.arange(scores.size(-1), 0, -1, device=scores.device, dtype=torch.float32)  # exact below 2^24
    return torch.where(keep, rank, 0.0).topk(n, dim=-1).indices


def sparse_attn(q: Tensor, kv: Tensor, indices: Tensor, sink: Tensor, scale: float) -> Tensor:
    """Multi-query attention of each query over a gathered set of shared K = V rows, with a per-head sink.

    q: [B, S, H, D]; kv: [B, T, D] (one row per key, used as key and value); indices: [B, S, K] int32 rows of kv
    (-1 = empty slot, ignored); sink: [H] float32; scale: softmax scale. For query (b, s) and head h:
    p_j = exp(scale * q . kv[idx_j]) / (sum_j' exp(scale * q . kv[idx_j']) + exp(sink[h])) over the non-empty
    slots, out = sum_j p_j kv[idx_j] (the sink only enlarges the denominator). A query with no non-empty slot gets
    zeros. Float32 math; returns q's dtype, shape [B, S, H, D].
    """
    b, s, k = indices.shape
    if s > _QUERY_BLOCK:                # bound the gathered [B, S, K, D] keys on long prefill chunks
        return torch.cat([sparse_attn(q[:, i:i + _QUERY_BLOCK], kv, indices[:, i:i + _QUERY_BLOCK], sink, scale)
                          for i in range(0, s, _QUERY_BLOCK)], dim=1)
    valid = indices >= 0
    rows = indices.clamp(min=0).long().reshape(b, s * k, 1).expand(-1, -1, kv.size(-1))
    keys = kv.gather(1, rows).view(b, s, k, -1).float()
    logits = torch.einsum("bshd,bskd->bshk", q.float(), keys) * scale
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    sink = sink.float().view(1, 1, -1, 1).expand(b, s, -1, 1)
    # softmax over [keys..., sink] and drop the sink's column: exact, and safe when every slot is empty
    probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bshk,bskd->bshd", probs, keys).to(q.dtype)


# ----------------------------------------------------------------------------------------------- mHC
def sinkhorn(mixes: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Split hyper-connection mixes into (pre, post, comb) for n streams (deepseek-v4.md §5).

    mixes: [..., (2 + n) * n] float32 (rows: n pre, n post, n*n comb, row-major comb[k, j]); scale: [3]; base:
    [(2 + n) * n]. pre = sigmoid(m[:n] * scale[0] + base[:n]) + eps; post = 2 * sigmoid(m[n:2n] * scale[1] +
    base[n:2n]); comb = softmax_rows(m[2n:] * scale[2] + base[2n:]) + eps, then divide columns by (column sum +
    eps), then `iters - 1` times rows by (row sum + eps) and columns by (column sum + eps) (iters normalisation
    rounds in all, the first one being the row softmax). Returns float32 pre [..., n], post [..., n],
    comb [..., n, n].
    """
    n = math.isqrt(mixes.size(-1) + 1) - 1
    m, scale, base = mixes.float(), scale.float(), base.float()
    pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (m[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = comb.softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def _hc_mixes(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    """(vec(X) . fn^T) / RMS(vec(X)) per token, in float32. x: [B, S, n, D] -> [B, S, rows of fn]."""
    flat = x.flatten(2).float()
    return F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce the n residual streams to one sub-block input and compute the mixing weights (deepseek-v4.md §5).

    x: [B, S, n, D] streams; fn: [(2 + n) * n, n * D] float32; scale: [3]; base: [(2 + n) * n].
    mixes = (flatten(x) . fn^T) * rsqrt(mean(flatten(x)^2) + norm_eps); (pre, post, comb) = sinkhorn(mixes, ...);
    y = sum_k pre[k] * x[k]. Returns y [B, S, D] in x's dtype, post [B, S, n] and comb [B, S, n, n] float32.
    """
    pre, post, comb = sinkhorn(_hc_mixes(x, fn, norm_eps), scale, base, iters, eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(dim=2)
    return y.to(x.dtype), post, comb


def hc_post(y: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """Expand a sub-block output back into n streams: new X_j = post[j] * y + sum_k comb[k, j] * X_k.

    y: [B, S, D]; residual: [B, S, n, D] (the streams X before the sub-block); post: [B, S, n]; comb: [B, S, n, n].
    Float32 math; returns [B, S, n, D] in y's dtype.
    """
    mixed = torch.einsum("bskj,bskd->bsjd", comb.float(), residual.float())
    return (post.float().unsqueeze(-1) * y.float().unsqueeze(2) + mixed).to(y.dtype)


def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float) -> Tensor:
    """Final stream reduction before the output norm: pre = sigmoid(mixes * scale + base) + eps (no Sinkhorn),
    y = sum_k pre[k] * x[k]. x: [B, S, n, D]; fn: [n, n * D]; scale: [1]; base: [n]. Returns [B, S, D], x's dtype."""
    pre = torch.sigmoid(_hc_mixes(x, fn, norm_eps) * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=2).to(x.dtype)


# ----------------------------------------------------------------------------------------------- MoE routing
def gate_topk(logits: Tensor, bias: Tensor | None, tid2eid: Tensor | None, input_ids: Tensor | None,
              topk: int, route_scale: float) -> tuple[Tensor, Tensor]:
    """Sqrt-softplus expert routing (deepseek-v4.md §4).

    logits: [N, E] = x W^T (float32); bias: [E] float32 or None; tid2eid: [vocab, topk] integer or None (hash
    layer); input_ids: [N] integer (needed when tid2eid is given). score = sqrt(softplus(logits)). Hash layer:
    indices = tid2eid[input_ids]; otherwise indices = top-`topk` of (score + bias) (bias only chooses).
    weights = score gathered at indices, divided by their sum, times route_scale.
    Returns (weights float32 [N, topk], indices int64 [N, topk]).
    """
    scores = F.softplus(logits.float()).sqrt()
    if tid2eid is not None:
        indices = tid2eid[input_ids].long()
    else:
        choice = scores if bias is None else scores + bias.float()
        indices = choice.topk(topk, dim=-1).indices
    weights = scores.gather(-1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True) * route_scale
    return weights, indices


def take_rows(stack: Tensor, index: Tensor) -> Tensor:
    """stack[index] along dim 0; one-byte dtypes (fp8, e8m0, packed fp4) gathered as bytes, which every
    backend's index kernel supports."""
    if stack.element_size() == 1 and stack.dtype != torch.uint8:
        return stack.view(torch.uint8)[index].view(stack.dtype)
    return stack[index]


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> Tensor:
    """y = x W^T for a weight kept in its stored format (`model.linear.Linear`): x [..., in], weight / scale as
    `model.quant.weight_layout` stores them, returns [..., out] in x's dtype. Reference: dequantise the whole weight
    into x's dtype (exact), then one matmul; fused backends read the stored bytes instead."""
    return F.linear(x, quant.dequantize_weight(weight, scale, fmt, x.dtype))


def f32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """y = x W^T in float32 for the float32 projections of the model (router, compressor wkv / wgate, output head):
    x [..., in] and weight [out, in] each bf16 or float32, as held; returns float32 [..., out]. Reference: both cast
    to float32, one matmul. The product of two bf16 values is exact in float32, so a backend may multiply bf16
    operands directly with float32 accumulation and output (the same products, summed in another order) instead of
    materialising a float32 copy of the weight on every call."""
    return F.linear(x.float(), weight.float())


def grouped_linear(x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> Tensor:
    """A block-diagonal projection (attention's grouped output projection `wo_a`): x [..., G, in]; weight / scale
    a stored [G * out, in] weight (`model.quant.weight_layout`) whose rows [g * out, (g + 1) * out) serve group g.
    Returns [..., G, out] in x's dtype, y[..., g, :] = x[..., g, :] @ W_g^T. Reference: dequantise the whole weight
    into x's dtype, then one einsum over the groups."""
    groups = x.size(-2)
    w = quant.dequantize_weight(weight, scale, fmt, x.dtype).view(groups, weight.size(0) // groups, -1)
    return torch.einsum("...gd,grd->...gr", x, w)


def group_experts(expert_idx: Tensor, n_experts: int, fmt: str) -> tuple | None:
    """Whatever a backend's `expert_matmul` computes from the expert ids before it multiplies (a sort by expert,
    group bounds), computed once for the calls that share ids (a MoE layer's joint w1 + w3, then w2) and passed to
    each as `groups`. expert_idx [N] as for `expert_matmul`, E stacked experts of format `fmt`. Reference: None (its
    gather needs no grouping)."""
    return None


def expert_matmul(x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str, expert_idx: Tensor,
                  groups: tuple | None = None) -> Tensor:
    """One row per selection times the stored weight of that selection's expert (the static MoE path).

    x: [N, in]; weight: stacked stored weights [E, out, in/2] int8 (fp4, e2m1 low nibble first), [E, out, in]
    float8_e4m3fn (fp8) / int8 / bfloat16 / float32; scale: the stacked scales ([E, out, in/32] float8_e8m0fnu for
    fp4, [E, ceil(out/128), ceil(in/128)] for fp8, float32 [E, out] for int8, None for bf16 / fp32), as
    `model.quant` stores them; fmt: the format name; expert_idx: [N] integer stack rows, negative for a selection no
    local expert serves (expert parallelism: another rank's). y[n] = dequant(weight[expert_idx[n]]) @ x[n], zeros
    where expert_idx[n] < 0, returned [N, out] in x's dtype; groups: this table's `group_experts(expert_idx, E, fmt)`
    or None. Reference: gathers and dequantises every selection's weight ([N, out, in] in x's dtype), then one
    batched matmul (no grouping).
    """
    rows = expert_idx.clamp(min=0)
    w = quant.dequantize_weight(take_rows(weight, rows), None if scale is None else take_rows(scale, rows), fmt, x.dtype)
    y = torch.bmm(x.unsqueeze(1), w.mT).squeeze(1)
    return torch.where((expert_idx >= 0).unsqueeze(1), y, 0.0)


def argmax(scores: Tensor) -> Tensor:
    """The greedy pick (`model.generate.Sampler`): scores [..., V] -> int64 [...], the index of each row's largest
    score, the first of equal ones, a NaN counting as the largest (torch.argmax's rule)."""
    return scores.argmax(-1)


# ----------------------------------------------------------------------------------------------- compressor
def pool_blocks(kv: Tensor, score: Tensor, overlap: bool) -> Tensor:
    """Gated pooling of whole blocks. kv, score: float32 [B, n_blocks, ratio, coff * d] -> [B, n_blocks', d].

    Without overlap every block gives one entry. With overlap (coff = 2) entry k pools block k's first d channels
    with block k+1's last d channels, so n_blocks' = n_blocks - 1 (the first block only lends its first half).
    """
    if overlap:
        d = kv.size(-1) // 2
        kv = torch.cat((kv[:, :-1, :, :d], kv[:, 1:, :, d:]), dim=2)
        score = torch.cat((score[:, :-1, :, :d], score[:, 1:, :, d:]), dim=2)
    return (kv * score.softmax(dim=2)).sum(dim=2)


def chunk_blocks(start: Tensor, n_valid: Tensor, s: int, ratio: int) -> tuple[Tensor, Tensor]:
    """The N = ceil(s / ratio) + 1 blocks a chunk of s tokens at `start` may touch: (ids [B, N] int64, complete
    [B, N] bool: the blocks whose last token is among the chunk's n_valid valid ones or before)."""
    ids = (start // ratio)[:, None] + torch.arange((s + ratio - 1) // ratio + 1, device=start.device)
    return ids, (ids + 1) * ratio <= (start + n_valid)[:, None]


def compress_blocks(kv: Tensor, score: Tensor, start: Tensor, n_valid: Tensor, state_kv: Tensor,
                    state_score: Tensor, ratio: int, overlap: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The compressor's pooling of a chunk (model/compressor.py): its tokens joined with the unfinished block(s)
    carried in the state, every block the chunk completes pooled (`pool_blocks`), the state advanced.

    kv, score: float32 [B, S, W] projections of the chunk's tokens (score with `ape` added; W = 2d with overlap,
    else d); token s of sequence b at position start[b] + s, valid iff s < n_valid[b]. state_kv, state_score:
    float32 [B, (1 + overlap) * ratio, W], the `model.cache.CompressorState` layout, **updated in place** (the one
    stage that writes its inputs: the compressor's carry between calls). Returns (ids, complete) of
    `chunk_blocks` and the pooled entries float32 [B, N, d], zero where not complete.
    """
    b, s, width = kv.shape
    r, ov = ratio, int(overlap)
    ids, complete = chunk_blocks(start, n_valid, s, r)
    # staging buffer: blocks (first - ov) .. first + n - 1, starting with the saved state, plus a discard slot
    first, n = start // r, ids.size(1)
    size = (ov + n) * r
    stage_kv = torch.cat((state_kv, kv.new_zeros(b, size + 1 - state_kv.size(1), width)), dim=1)
    stage_score = torch.cat((state_score, kv.new_full((b, size + 1 - state_kv.size(1), width), float("-inf"))),
                            dim=1)
    steps = torch.arange(s, device=kv.device)
    slot = torch.where(steps < n_valid[:, None], ov * r + start[:, None] + steps - first[:, None] * r, size)
    slot = slot.unsqueeze(-1).expand(-1, -1, width)
    stage_kv.scatter_(1, slot, kv)
    stage_score.scatter_(1, slot, score)
    pooled = pool_blocks(stage_kv[:, :size].view(b, ov + n, r, width),
                         stage_score[:, :size].view(b, ov + n, r, width), overlap)
    pooled = torch.where(complete.unsqueeze(-1), pooled, 0.0)     # unfinished blocks pooled -inf scores
    # new state: the block holding the next token (and the one before it for overlap)
    keep = ((start + n_valid) // r - first)[:, None] * r + torch.arange(state_kv.size(1), device=kv.device)
    keep = keep.unsqueeze(-1).expand(-1, -1, width)
    state_kv.copy_(stage_kv.gather(1, keep))
    state_score.copy_(stage_score.gather(1, keep))
    return ids, complete, pooled


# ----------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Kernels:
    """The table of fused stages the model calls; each field defaults to the reference function of that name."""

    rms_norm: Callable[..., Tensor] = rms_norm
    linear: Callable[..., Tensor] = linear
    rope: Callable[..., Tensor] = rope
    hadamard: Callable[..., Tensor] = hadamard
    indexer_topk: Callable[..., Tensor] = indexer_topk
    sparse_attn: Callable[..., Tensor] = sparse_attn
    sinkhorn: Callable[..., tuple[Tensor, Tensor, Tensor]] = sinkhorn
    hc_pre: Callable[..., tuple[Tensor, Tensor, Tensor]] = hc_pre
    hc_post: Callable[..., Tensor] = hc_post
    hc_head: Callable[..., Tensor] = hc_head
    gate_topk: Callable[..., tuple[Tensor, Tensor]] = gate_topk
    f32_linear: Callable[..., Tensor] = f32_linear
    grouped_linear: Callable[..., Tensor] = grouped_linear
    group_experts: Callable[..., tuple | None] = group_experts
    expert_matmul: Callable[..., Tensor] = expert_matmul
    argmax: Callable[..., Tensor] = argmax
    compress_blocks: Callable[..., tuple[Tensor, Tensor, Tensor]] = compress_blocks
    # stored formats whose `expert_matmul` reads each expert's weight once per group of its rows (a grouped kernel),
    # not once per row as the reference's gather does: for them the static MoE path has no per-selection weight copy
    # and is the faster one at any size (a prefill chunk too), not only at decode sizes
    grouped_expert_formats: tuple[str, ...] = ()
    # the FP8 KV / FP4 indexer round-trip simulations (model.quant, (x, block) -> x's dtype): a table may route them
    # elsewhere, as the ONNX export does to write each as one node
    fp8_round_trip: Callable[..., Tensor] = quant.fp8_round_trip
    fp4_round_trip: Callable[..., Tensor] = quant.fp4_round_trip
    # a backend's fusion of the CSA indexer's RoPE, Hadamard and FP4 simulation of its queries and keys (x [B, S, H,
    # D], cos, sin [B, S, R/2], fp4_block or 0 -> x's dtype; called by `rotate_index`); None: those three stages of
    # this table in turn. Where it is set, replacing `rope`, `hadamard` or `fp4_round_trip` in the table no longer
    # changes the indexer's queries and keys
    index_rotate: Callable[..., Tensor] | None = None
    # a backend whose `indexer_topk` is its scores (q, k, weights, n_visible -> float32 [B, S, T], `indexer_scores`'
    # contract), their sum over tensor-parallel ranks (`sum_scores`), then `select_topk` of them names the two kernels
    # here, so that a decode schedule can order other work between them (ascend.backends.streams: wq_b beside the
    # top-k); None: `indexer_topk` is one fused operator (the NPU's npu_lightning_indexer) and is not split. A table
    # that replaces `indexer_topk` replaces or clears these too
    indexer_scores: Callable[..., Tensor] | None = None
    select_topk: Callable[..., Tensor] = select_topk


REFERENCE = Kernels()


def round_kv_entries(kernels: Kernels, x: Tensor, rope_dim: int) -> Tensor:
    """The KV cache's FP8 simulation of main entries (the window's rows and the compressor's pooled ones): the
    non-RoPE dims through `kernels.fp8_round_trip` per `quant.KV_FP8_BLOCK`; the last `rope_dim` (RoPE) dims stay
    in the model dtype, as the cache stores them in BF16."""
    return torch.cat((kernels.fp8_round_trip(x[..., :-rope_dim], quant.KV_FP8_BLOCK), x[..., -rope_dim:]), dim=-1)


def rotate_index(kernels: Kernels, x: Tensor, cos: Tensor, sin: Tensor, fp4: bool) -> Tensor:
    """The CSA indexer's rotation of its queries x [B, S, H, D] and of its compressor's keys x [B, N, D]: RoPE, the
    Hadamard transform and, with `fp4`, the FP4 simulation per `quant.FP4_BLOCK`; one call of the table's
    `index_rotate` where it fuses them (keys as one head), else its three stages in turn."""
    if kernels.index_rotate is not None:
        keys = x.dim() == 3
        y = kernels.index_rotate(x.unsqueeze(2) if keys else x, cos, sin, quant.FP4_BLOCK if fp4 else 0)
        return y.squeeze(2) if keys else y
    x = kernels.hadamard(kernels.rope(x, cos, sin))
    return kernels.fp4_round_trip(x, quant.FP4_BLOCK) if fp4 else x


def use_kernels(module: torch.nn.Module, kernels: Kernels) -> torch.nn.Module:
    """Point every submodule of `module` that calls kernels (attention, compressor, indexer, norms, projections,
    router, head) at `kernels`; returns `module`."""
    for m in module.modules():
        for holder in (m, *vars(m).values()):     # the module, and plain helpers it holds (mHC around a block)
            if isinstance(getattr(holder, "kernels", None), Kernels):
                holder.kernels = kernels
    return module
