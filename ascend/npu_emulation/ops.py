"""CPU implementations of torch_npu operators, written from their published documentation.

Each function has the exact parameter list of the operator's schema (the dispatcher has already
checked names, types and arity against the wheel's schema before we get here) and implements the
semantics of the Ascend/op-plugin page `docs/zh/custom_APIs/torch_npu/torch_npu-<op>.md` named in its
docstring, computing in float32 and returning the documented dtypes and shapes. Documented limits on
shapes and dtypes are enforced with `_need` (RuntimeError, as the real operator fails);
modes the emulation does not implement raise NotImplementedError: no argument is silently ignored.
Limits that depend on the SoC (A2/A3 vs Ascend 950) are the union here; the NPU backend
(ascend/backends/npu.py) applies the per-SoC ones before it calls an operator.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INT64_MAX = (1 << 63) - 1
SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def _need(ok: bool, message: str) -> None:
    """Fail as the real operator does (RuntimeError) when a documented limit is not met."""
    if not ok:
        raise RuntimeError(message)


def _unsupported(op: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"npu emulation of {op}: {what} is not emulated")


# ------------------------------------------------------------------------------ norms, rope

def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """torch_npu-npu_rms_norm: y = x * rsqrt(mean(x^2 over gamma's dims) + eps) * gamma in x's dtype, rstd in fp32.
    Dtype pairs (the page's A2/A3 table): gamma in x's dtype, or an fp32 gamma with a half x."""
    _need(self.dtype in FLOATS, f"npu_rms_norm: self dtype {self.dtype} not supported")
    _need(gamma.dtype == self.dtype or (gamma.dtype == torch.float32 and self.dtype in HALF),
          f"npu_rms_norm: gamma dtype {gamma.dtype} with self dtype {self.dtype} is not a documented pair")
    nd = gamma.dim()
    _need(1 <= nd <= self.dim() and tuple(self.shape[-nd:]) == tuple(gamma.shape),
          f"npu_rms_norm: gamma shape {tuple(gamma.shape)} must match the last dims of {tuple(self.shape)}")
    dims = tuple(range(self.dim() - nd, self.dim()))
    x = self.float()
    rstd = torch.rsqrt(x.square().mean(dims, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def npu_interleave_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """torch_npu-npu_interleave_rope: de-interleave the pairs of D=64, then q*cos + RotateHalf(q)*sin.

    The result stays in the de-interleaved (rotate-half) layout: out[:32] are the rotated first
    members of the pairs, out[32:] the second members.
    """
    _need(x.dim() == 4 and x.shape[-1] == 64, f"npu_interleave_rope: x must be [B,N,S,64], got {tuple(x.shape)}")
    _need(cos.shape == sin.shape and cos.dim() == 4, "npu_interleave_rope: cos and sin must be equal 4-D shapes")
    _need(cos.shape[0] == x.shape[0] and cos.shape[1] == 1 and cos.shape[2] in (1, x.shape[2]) and cos.shape[3] == 64,
          f"npu_interleave_rope: cos shape {tuple(cos.shape)} must be [B,1,S or 1,64] for x {tuple(x.shape)}")
    _need(x.dtype in FLOATS and cos.dtype == x.dtype and sin.dtype == x.dtype,
          "npu_interleave_rope: x, cos, sin must share a float dtype")
    q = x.float().unflatten(-1, (32, 2)).transpose(-1, -2).flatten(-2)
    rotated = torch.cat([-q[..., 32:], q[..., :32]], dim=-1)
    return (q * cos.float() + rotated * sin.float()).to(x.dtype)


# ----------------------------------------------------------------------------------- routing

def npu_moe_gating_top_k(x: Tensor, k: int, *, bias: Tensor | None = None, input_ids: Tensor | None = None,
                         tid2eid: Tensor | None = None, k_group: int = 1, group_count: int = 1,
                         group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0, out_flag: bool = False,
                         routed_scaling_factor: float = 1.0, eps: float = 1e-20) -> tuple[Tensor, Tensor, Tensor]:
    """torch_npu-npu_moe_gating_top_k: norm (0 softmax / 1 sigmoid), + bias for the choice only,
    optional group-limited choice, top-k (stable: lower expert id wins ties), y gathered from the
    unbiased norm; with norm_type 1, y /= sum(y) + eps; then y *= routed_scaling_factor.

    Hash mode (input_ids and tid2eid): the page says only that expert ids are looked up in tid2eid by
    input_ids; we take the experts as tid2eid[input_ids] and keep every other step unchanged.
    """
    T, E = x.shape if x.dim() == 2 else (0, 0)
    _need(x.dim() == 2 and x.dtype in FLOATS, "npu_moe_gating_top_k: x must be a 2-D float tensor")
    _need(E <= 2048, f"npu_moe_gating_top_k: at most 2048 experts, got {E}")
    _need(renorm == 0, "npu_moe_gating_top_k: only renorm=0 is supported")
    _need(norm_type in (0, 1), f"npu_moe_gating_top_k: norm_type must be 0 or 1, got {norm_type}")
    _need(group_select_mode in (0, 1), "npu_moe_gating_top_k: group_select_mode must be 0 or 1")
    _need(group_count > 0 and E % group_count == 0 and E // group_count > 2,
          f"npu_moe_gating_top_k: {E} experts cannot form {group_count} groups of more than 2")
    _need(1 <= k_group <= group_count and 1 <= k <= E // group_count * k_group,
          f"npu_moe_gating_top_k: need 1 <= k_group <= group_count and 1 <= k <= E/group_count*k_group")
    if bias is not None:
        _need(bias.shape == (E,) and bias.dtype == x.dtype, "npu_moe_gating_top_k: bias must be [E] in x's dtype")
    _need((input_ids is None) == (tid2eid is None), "input_ids and tid2eid must be both provided or both omitted")
    norm = torch.softmax(x.float(), -1) if norm_type == 0 else torch.sigmoid(x.float())
    if tid2eid is not None:
        _need(input_ids.shape == (T,) and tid2eid.dim() == 2 and tid2eid.shape[1] == k,
              "npu_moe_gating_top_k: input_ids must be [T] and tid2eid [vocab, k]")
        idx = tid2eid[input_ids.long()].long()
    else:
        choice = norm + bias.float() if bias is not None else norm
        if group_count > 1:
            grouped = choice.view(T, group_count, -1)
            score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k_group]
            mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask[..., None], float("-inf")).view(T, E)
        idx = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]
    y = norm.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    return (y * routed_scaling_factor).to(x.dtype), idx.to(torch.int32), norm


# ----------------------------------------------------------------------------------- experts
GMM_MAX_GROUPS = 1024       # group_list length ("group_list第1维最大支持1024")
GMM_INNER_LIMIT = 65536     # each x / weight tensor's last dim ("内轴限制InnerLimit为65536")


def npu_grouped_matmul(x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
                       scale: list[Tensor] | None = None, offset: list[Tensor] | None = None,
                       antiquant_scale: list[Tensor] | None = None, antiquant_offset: list[Tensor] | None = None,
                       per_token_scale: list[Tensor] | None = None, group_list: Tensor | None = None,
                       activation_input: list[Tensor] | None = None,
                       activation_quant_scale: list[Tensor] | None = None,
                       activation_quant_offset: list[Tensor] | None = None, split_item: int | None = 0,
                       group_type: int | None = None, group_list_type: int | None = 0, act_type: int | None = 0,
                       tuning_config: list[int] | None = None, output_dtype: int | None = None,
                       x_dtype: int | None = None, weight_dtype: int | None = None, scale_dtype: int | None = None,
                       per_token_scale_dtype: int | None = None) -> list[Tensor]:
    """torch_npu-npu_grouped_matmul.md, the single-tensor m-axis scenario ("单单单"): one x [M, K], one weight
    [E, K, N] (a transposed view allowed), one y [M, N]; split_item 2 or 3, group_type 0, group_list a tensor of
    E values, cumulative row counts (group_list_type 0) or row counts (1), covering all M rows; rows of group e
    use weight[e]. Not quantised (x and weight of one float dtype: y_e = x_e @ w_e), or per-channel pseudo-quantised
    (int8 weight, antiquant_scale and optional antiquant_offset [E, N] in x's half dtype:
    y_e = x_e @ ((w_e + offset_e) * scale_e)). Every other scenario or argument raises NotImplementedError."""
    op = "npu_grouped_matmul"
    for name, value in (("bias", bias), ("scale", scale), ("offset", offset), ("per_token_scale", per_token_scale),
                        ("activation_input", activation_input), ("activation_quant_scale", activation_quant_scale),
                        ("activation_quant_offset", activation_quant_offset), ("tuning_config", tuning_config),
                        ("output_dtype", output_dtype), ("x_dtype", x_dtype), ("weight_dtype", weight_dtype),
                        ("scale_dtype", scale_dtype), ("per_token_scale_dtype", per_token_scale_dtype)):
        if value is not None:
            raise _unsupported(op, f"{name}")
    if act_type not in (None, 0):
        raise _unsupported(op, f"act_type={act_type}")
    if len(x) != 1 or len(weight) != 1 or split_item not in (2, 3) or group_type != 0:
        raise _unsupported(op, f"{len(x)} x / {len(weight)} weight tensors, split_item={split_item}, "
                               f"group_type={group_type} (only single tensors grouped on m)")
    if group_list_type not in (0, 1):
        raise _unsupported(op, f"group_list_type={group_list_type}")
    a, w = x[0], weight[0]
    _need(group_list is not None, f"{op}: group_list is required for single-tensor grouping")
    _need(a.dim() == 2 and w.dim() == 3, f"{op}: x must be 2-D and weight 3-D, got {a.dim()}-D and {w.dim()}-D")
    groups, k, n = w.shape
    _need(a.shape[1] == k, f"{op}: x has {a.shape[1]} columns, weight groups take {k}")
    _need(max(k, n) < GMM_INNER_LIMIT, f"{op}: inner dims must be < {GMM_INNER_LIMIT}, got K={k} N={n}")
    _need(group_list.dim() == 1 and group_list.numel() == groups <= GMM_MAX_GROUPS and group_list.dtype == torch.int64,
          f"{op}: group_list must be int64 [{groups}] (at most {GMM_MAX_GROUPS}), got {group_list.dtype} "
          f"{tuple(group_list.shape)}")
    values = group_list.tolist()
    _need(all(v >= 0 for v in values), f"{op}: group_list must be non-negative")
    if group_list_type == 0:
        _need(all(b >= a_ for a_, b in zip(values, values[1:])), f"{op}: cumulative group_list must not decrease")
        ends = values
    else:
        ends = torch.tensor(values).cumsum(0).tolist()
    _need(ends[-1] == a.shape[0], f"{op}: group_list covers {ends[-1]} rows, x has {a.shape[0]}")
    if w.dtype == torch.int8:
        _need(a.dtype in HALF and antiquant_scale is not None and len(antiquant_scale) == 1,
              f"{op}: an int8 weight with {a.dtype} x needs a float16 / bfloat16 x and antiquant_scale")
        s = antiquant_scale[0]
        o = antiquant_offset[0] if antiquant_offset is not None else torch.zeros_like(s)
        _need(s.dtype == a.dtype and o.dtype == a.dtype and s.shape == o.shape == (groups, n),
              f"{op}: antiquant_scale / antiquant_offset must be {a.dtype} [{groups}, {n}]")
        w = (w.float() + o.float()[:, None, :]) * s.float()[:, None, :]
    else:
        _need(antiquant_scale is None and antiquant_offset is None, f"{op}: antiquant_* need an int8 weight")
        _need(a.dtype == w.dtype and a.dtype in FLOATS, f"{op}: x and weight must be one of float16 / bfloat16 / "
                                                        f"float32 without quantisation, got {a.dtype} and {w.dtype}")
    y = a.new_empty(a.shape[0], n)
    start = 0
    for e, end in enumerate(ends):
        y[start:end] = (a[start:end].float() @ w[e].float()).to(a.dtype)
        start = end
    return [y]


def npu_weight_quant_batchmatmul(x: Tensor, weight: Tensor, antiquant_scale: Tensor,
                                 antiquant_offset: Tensor | None = None, quant_scale: Tensor | None = None,
                                 quant_offset: Tensor | None = None, bias: Tensor | None = None,
                                 antiquant_group_size: int = 0, inner_precise: int = 0,
                                 weight_dtype: int | None = None) -> Tensor:
    """torch_npu-npu_weight_quant_batchmatmul.md, the per-tensor / per-channel int8 scenario: x [M, K] float16 /
    bfloat16, weight [K, N] int8 (a transposed view allowed), antiquant_scale (and optional antiquant_offset) of
    shape (1,), (N,) or (1, N) in x's dtype: y = x @ ((weight + offset) * scale), x's dtype. Per-group scales, int4
    (int32-packed) weights, int64 scales, bias and output quantisation (quant_scale) raise NotImplementedError."""
    op = "npu_weight_quant_batchmatmul"
    for name, value in (("quant_scale", quant_scale), ("quant_offset", quant_offset), ("bias", bias),
                        ("weight_dtype", weight_dtype)):
        if value is not None:
            raise _unsupported(op, name)
    if antiquant_group_size:
        raise _unsupported(op, f"per-group scales (antiquant_group_size={antiquant_group_size})")
    if weight.dtype != torch.int8 or antiquant_scale.dtype not in HALF:
        raise _unsupported(op, f"{weight.dtype} weights with {antiquant_scale.dtype} scales (only int8 with "
                               f"float16 / bfloat16 scales)")
    _need(x.dim() == 2 and weight.dim() == 2, f"{op}: x and weight must be 2-D, got {x.dim()}-D and {weight.dim()}-D")
    (m, k), n = x.shape, weight.shape[1]
    _need(x.dtype in HALF and antiquant_scale.dtype == x.dtype,
          f"{op}: x and antiquant_scale must share float16 / bfloat16, got {x.dtype} and {antiquant_scale.dtype}")
    _need(weight.shape[0] == k, f"{op}: x has K={k}, weight has {weight.shape[0]} rows")
    _need(m >= 1 and 1 <= k <= 65535 and 1 <= n <= 65535, f"{op}: needs M >= 1 and K, N in [1, 65535], got "
                                                            f"M={m} K={k} N={n}")
    _need(antiquant_scale.numel() in (1, n) and antiquant_scale.dim() <= 2,
          f"{op}: antiquant_scale must be (1,), (N,) or (1, N), got {tuple(antiquant_scale.shape)}")
    off = antiquant_offset if antiquant_offset is not None else torch.zeros_like(antiquant_scale)
    _need(off.shape == antiquant_scale.shape and off.dtype == antiquant_scale.dtype,
          f"{op}: antiquant_offset must match antiquant_scale's shape and dtype")
    w = (weight.float() + off.float().reshape(-1)) * antiquant_scale.float().reshape(-1)
    return (x.float() @ w).to(x.dtype)


# --------------------------------------------------------------------------------------- mHC

def npu_mhc_pre(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, *, gamma: Tensor | None = None,
                norm_eps: float = 1e-6, hc_eps: float = 1e-6, out_flag: int = 0,
                inner_precise: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torch_npu-npu_mhc_pre: h_mix = (vec x * gamma) @ phi^T (the page: "x with phi matrix-multiplied"; op-plugin's
    test_npu_mhc_pre.py applies inv_rms after it), m = h_mix * inv_rms, i.e. RmsNorm(vec x) @ phi^T;
    pre = sigmoid(a0*m_pre + b) + hc_eps; post = 2*sigmoid(a1*m_post + b); res = a2*m_res + b (before Sinkhorn);
    h_in = sum_k pre_k x_k.

    Returns (h_in, h_post, h_res, inv_rms, h_mix, h_pre) with the meta function's shapes.
    inner_precise (FP32 vs HF32 matmul on the Cube) has no CPU equivalent: both compute in FP32.
    """
    _need(x.dim() in (3, 4) and x.dtype in HALF, "npu_mhc_pre: x must be bf16/fp16 [B,S,n,D] or [T,n,D]")
    n, D = x.shape[-2], x.shape[-1]
    _need(n in (4, 6, 8) and 1 <= D <= 16384 and D % 16 == 0,
          f"npu_mhc_pre: n must be 4/6/8 and D a multiple of 16, got n={n} D={D}")
    _need(alpha.numel() in (2, 3), "npu_mhc_pre: alpha must have 2 or 3 elements")
    has_res = alpha.numel() == 3
    K = n * n + 2 * n if has_res else 2 * n
    _need(phi.dtype == torch.float32 and tuple(phi.shape) == (K, n * D),
          f"npu_mhc_pre: phi must be fp32 [{K}, {n * D}]")
    _need(bias.dtype == torch.float32 and bias.numel() == K, f"npu_mhc_pre: bias must be fp32 [{K}]")
    _need(out_flag in (0, 1) and inner_precise in (0, 1), "npu_mhc_pre: out_flag and inner_precise must be 0 or 1")
    xf = x.float()
    flat = xf.flatten(-2)
    inv_rms = torch.rsqrt(flat.square().mean(-1) + norm_eps)
    if gamma is not None:
        _need(tuple(gamma.shape) == (n, D), f"npu_mhc_pre: gamma must be [{n}, {D}]")
        flat = flat * gamma.float().flatten()
    h_mix = flat @ phi.t()
    m = h_mix * inv_rms[..., None]
    a = alpha.float()
    b = bias.float()
    h_pre = torch.sigmoid(a[0] * m[..., :n] + b[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(a[1] * m[..., n:2 * n] + b[n:2 * n])
    if has_res:
        h_res = (a[2] * m[..., 2 * n:] + b[2 * n:]).unflatten(-1, (n, n))
    else:
        h_res = torch.zeros(1)
    h_in = (h_pre[..., None] * xf).sum(-2).to(x.dtype)
    return h_in, h_post, h_res, inv_rms, h_mix, h_pre


def npu_mhc_post(x: Tensor, h_res: Tensor | None, h_out: Tensor, h_post: Tensor) -> Tensor:
    """torch_npu-npu_mhc_post: y_j = h_post_j * h_out + sum_k h_res[k, j] * x_k (h_res None: x_j)."""
    _need(x.dim() in (3, 4) and x.dtype in HALF, "npu_mhc_post: x must be bf16/fp16 [B,S,n,D] or [T,n,D]")
    _need(h_out.dtype == x.dtype and tuple(h_out.shape) == tuple(x.shape[:-2]) + (x.shape[-1],),
          "npu_mhc_post: h_out must be x's dtype with shape [..., D]")
    _need(h_post.dtype == torch.float32 and tuple(h_post.shape) == tuple(x.shape[:-1]),
          "npu_mhc_post: h_post must be fp32 [..., n]")
    xf = x.float()
    y = h_post[..., None] * h_out.float()[..., None, :]
    if h_res is None:
        y = y + xf
    else:
        n = x.shape[-2]
        _need(h_res.dtype == torch.float32 and tuple(h_res.shape) == tuple(x.shape[:-2]) + (n, n),
              "npu_mhc_post: h_res must be fp32 [..., n, n]")
        y = y + torch.einsum("...kj,...kd->...jd", h_res, xf)
    return y.to(x.dtype)


def npu_mhc_sinkhorn(x: Tensor, *, eps: float = 1e-6, num_iters: int = 20,
                     out_flag: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """torch_npu-npu_mhc_sinkhorn: softmax over rows + eps, then column / row normalisation, ending
    with a column normalisation, num_iters rounds in all (every sum gets + eps)."""
    _need(x.dim() in (3, 4) and x.dtype == torch.float32 and x.shape[-1] == x.shape[-2] and x.shape[-1] in (4, 6, 8),
          f"npu_mhc_sinkhorn: x must be fp32 [..., n, n] with n in 4/6/8, got {tuple(x.shape)} {x.dtype}")
    _need(0 < num_iters <= 100, f"num_iters must be within (0, 100], but got {num_iters}.")
    if out_flag:
        raise _unsupported("npu_mhc_sinkhorn", "out_flag=1 (intermediate norm/sum outputs for training)")
    y = torch.softmax(x, -1) + eps
    y = y / (y.sum(-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        y = y / (y.sum(-1, keepdim=True) + eps)
        y = y / (y.sum(-2, keepdim=True) + eps)
    return y, x.new_empty(0), x.new_empty(0)


# ------------------------------------------------------------------ sequences, layouts, masks

def _lengths(lengths: Tensor | None, default: int, batch: int, cumulative: bool) -> list[int]:
    """Per-batch valid lengths from an actual_seq_lengths tensor (prefix sums when cumulative)."""
    if lengths is None:
        return [default] * batch
    vals = [int(v) for v in lengths.tolist()]
    if cumulative:
        _need(all(b >= a for a, b in zip([0] + vals, vals)), "cumulative lengths must not decrease")
        return [b - a for a, b in zip([0] + vals, vals)]
    return vals


def _split_query(op: str, query: Tensor, layout: str, lengths: Tensor | None, what: str = "query") -> list[Tensor]:
    """Per-batch [S_b, N, D] views of a BSND or TND tensor (TND needs cumulative lengths); `what` names it in
    errors."""
    if layout == "BSND":
        _need(query.dim() == 4, f"{op}: BSND {what} must be 4-D")
        lens = _lengths(lengths, query.shape[1], query.shape[0], cumulative=False)
        return [query[b, :n] for b, n in enumerate(lens)]
    if layout == "TND":
        _need(query.dim() == 3 and lengths is not None, f"{op}: TND {what} must be 3-D with its actual lengths")
        ends = [int(v) for v in lengths.tolist()]
        return [query[a:b] for a, b in zip([0] + ends, ends)]
    raise _unsupported(op, f"{what} layout {layout!r}")


def _split_kv(op: str, key: Tensor, layout: str, lengths: Tensor | None, block_table: Tensor | None,
              batch: int) -> list[Tensor]:
    """Per-batch [S2_b, N2, D] key (or value) sequences for BSND, TND and paged PA_BSND layouts."""
    if layout != "PA_BSND":
        return _split_query(op, key, layout, lengths, "key")
    _need(key.dim() == 4 and block_table is not None and lengths is not None,
          f"{op}: PA_BSND key needs [blocks, block_size, N, D], block_table and actual lengths")
    block_size = key.shape[1]
    _need(block_size % 16 == 0 and block_size <= 1024, f"{op}: block_size must be a multiple of 16 up to 1024")
    _need(block_table.dtype == torch.int32 and block_table.shape[0] == batch,
          f"{op}: block_table must be int32 [B, blocks]")
    lens = _lengths(lengths, 0, batch, cumulative=False)
    out = []
    for b, n in enumerate(lens):
        need = -(-n // block_size)
        _need(need <= block_table.shape[1], f"{op}: block_table too short for {n} tokens")
        out.append(key[block_table[b, :need].long()].flatten(0, 1)[:n])
    return out


def _causal_limit(sparse_mode: int, s1: int, s2: int) -> Tensor:
    """Per query row i, the largest visible kv position: all for mode 0, rightDownCausal for mode 3."""
    rows = torch.arange(s1)
    return torch.full((s1,), s2 - 1) if sparse_mode == 0 else rows + (s2 - s1)


def _stack_rows(per_batch: list[Tensor], layout: str, batch_rows: int, fill) -> Tensor:
    """Per-batch [S_b, ...] results back to BSND [B, S, ...] (padded with fill) or TND [T, ...]."""
    if layout == "TND":
        return torch.cat(per_batch, 0)
    out = per_batch[0].new_full((len(per_batch), batch_rows) + tuple(per_batch[0].shape[1:]), fill)
    for b, r in enumerate(per_batch):
        out[b, :r.shape[0]] = r
    return out


# ------------------------------------------------------------------------- lightning indexer

def _indexer_topk(op: str, query: Tensor, key: Tensor, weights: Tensor, score_scale: tuple[Tensor, Tensor] | None,
                  actual_seq_lengths_query, actual_seq_lengths_key, block_table, layout_query: str, layout_key: str,
                  sparse_count: int, sparse_mode: int, pre_tokens: int, next_tokens: int, max_count: int) -> Tensor:
    """Shared body of the two lightning indexers: per query row i and visible key j,
    score = sum_h w[i, h] * ReLU(s_q[i, h] * s_k[j] * q[i, h] . k[j]) (scales 1 when not quantised), top
    sparse_count in descending score, int32, -1 padding at the end of a row."""
    _need(query.shape[-1] == 128 and key.shape[-1] == 128, f"{op}: D must be 128")
    _need(query.shape[-2] <= 64 and key.shape[-2] == 1, f"{op}: query heads <= 64 and one key head")
    _need(sparse_count in SPARSE_COUNTS and sparse_count <= max_count,
          f"{op}: sparse_count {sparse_count} is not supported")
    _need(sparse_mode in (0, 3), f"{op}: sparse_mode must be 0 or 3")
    _need(pre_tokens == INT64_MAX and next_tokens == INT64_MAX,
          f"{op}: only the default pre_tokens/next_tokens are supported")
    split_q = lambda t: _split_query(op, t, layout_query, actual_seq_lengths_query)  # noqa: E731
    qs, ws = split_q(query), split_q(weights[..., None])
    ks = _split_kv(op, key, layout_key, actual_seq_lengths_key, block_table, len(qs))
    if score_scale is None:
        sqs, sks = [None] * len(qs), [None] * len(qs)
    else:
        sqs = split_q(score_scale[0][..., None])
        sks = _split_kv(op, score_scale[1][..., None], layout_key, actual_seq_lengths_key, block_table, len(qs))
    results = []
    for q, w, k, sq, sk in zip(qs, ws, ks, sqs, sks):
        s1, s2 = q.shape[0], k.shape[0]
        dots = torch.einsum("shd,td->sht", q.float(), k[:, 0].float())
        if sq is not None:
            dots = dots * sq.float() * sk[:, 0, 0].float()
        score = (torch.relu(dots) * w.float()).sum(1)
        visible = torch.arange(s2)[None, :] <= _causal_limit(sparse_mode, s1, s2)[:, None]
        score = score.masked_fill(~visible, float("-inf"))
        kk = min(sparse_count, s2)
        idx = torch.full((s1, sparse_count), -1, dtype=torch.int32)
        if kk:   # a stable sort: equal scores keep the lower index first, as ops-transformer's golden reference
            values, order = score.sort(dim=-1, descending=True, stable=True)
            idx[:, :kk] = torch.where(values[:, :kk] > float("-inf"), order[:, :kk], -1).to(torch.int32)
        results.append(idx[:, None, :])
    return _stack_rows(results, layout_query, query.shape[1] if layout_query == "BSND" else 0, -1)


def npu_lightning_indexer(query: Tensor, key: Tensor, weights: Tensor, *,
                          actual_seq_lengths_query: Tensor | None = None, actual_seq_lengths_key: Tensor | None = None,
                          block_table: Tensor | None = None,
                          layout_query: str = "BSND", layout_key: str = "BSND", sparse_count: int = 2048,
                          sparse_mode: int = 3, pre_tokens: int = INT64_MAX, next_tokens: int = INT64_MAX,
                          return_value: bool = False) -> tuple[Tensor, Tensor]:
    """torch_npu-npu_lightning_indexer: score[i, j] = sum_h w[i, h] * ReLU(q[i, h] . k[j]) over the
    visible keys (sparse_mode 0: all actual keys; 3: j <= L_kv - L_q + i), top sparse_count indices
    in descending score, int32, padded with -1 when fewer keys are visible.
    """
    op = "npu_lightning_indexer"
    _need(query.dtype in HALF and key.dtype == query.dtype, f"{op}: query and key must share bf16/fp16")
    _need(weights.dtype == torch.float32 or weights.dtype == query.dtype,
          f"{op}: weights must be fp32 or query's dtype")
    if return_value:
        raise _unsupported(op, "return_value=True (training only)")
    idx = _indexer_topk(op, query, key, weights, None, actual_seq_lengths_query, actual_seq_lengths_key, block_table,
                        layout_query, layout_key, sparse_count, sparse_mode, pre_tokens, next_tokens, 8192)
    return idx, query.new_empty(0)


def npu_quant_lightning_indexer(query: Tensor, key: Tensor, weights: Tensor, query_dequant_scale: Tensor,
                                key_dequant_scale: Tensor, query_quant_mode: int, key_quant_mode: int, *,
                                actual_seq_lengths_query: Tensor | None = None,
                                actual_seq_lengths_key: Tensor | None = None,
                                block_table: Tensor | None = None, layout_query: str = "BSND", layout_key: str = "BSND",
                                sparse_count: int = 2048, sparse_mode: int = 3, pre_tokens: int = INT64_MAX,
                                next_tokens: int = INT64_MAX, query_dtype: int | None = None,
                                key_dtype: int | None = None) -> Tensor:
    """torch_npu-npu_quant_lightning_indexer: as npu_lightning_indexer on int8 / float8_e4m3fn query and key
    with per-token-head dequantisation: ReLU((s_q[i, h] * s_k[j]) * (q[i, h] . k[j])); sparse_count 1-2048.

    query_dtype / key_dtype (the hifloat8 marker for uint8 storage) are not emulated: torch has no hifloat8.
    """
    op = "npu_quant_lightning_indexer"
    if query_dtype is not None or key_dtype is not None:
        raise _unsupported(op, "query_dtype/key_dtype (hifloat8 inputs)")
    _need(query_quant_mode == 0 and key_quant_mode == 0, f"{op}: only quant mode 0 (per-token-head) is supported")
    _need(query.dtype in (torch.int8, torch.float8_e4m3fn) and key.dtype == query.dtype,
          f"{op}: query and key must share int8 or float8_e4m3fn")
    _need(weights.dtype in HALF, f"{op}: weights must be float16/bfloat16")
    scale_dtypes = (torch.float16, torch.float32)
    _need(query_dequant_scale.dtype in scale_dtypes and key_dequant_scale.dtype in scale_dtypes,
          f"{op}: dequant scales must be float16/float32")
    _need(query_dequant_scale.shape == weights.shape, f"{op}: query_dequant_scale must have weights' shape")
    _need(tuple(key_dequant_scale.shape) == tuple(key.shape[:-1]),
          f"{op}: key_dequant_scale must be key's shape without D")
    return _indexer_topk(op, query, key, weights, (query_dequant_scale, key_dequant_scale), actual_seq_lengths_query,
                         actual_seq_lengths_key, block_table, layout_query, layout_key, sparse_count, sparse_mode,
                         pre_tokens, next_tokens, 2048)


# ---------------------------------------------------------------------- sparse flash attention

def npu_sparse_flash_attention(query: Tensor, key: Tensor, value: Tensor | None, sparse_indices: Tensor,
                               scale_value: float, *,
                               block_table: Tensor | None = None, actual_seq_lengths_query: Tensor | None = None,
                               actual_seq_lengths_kv: Tensor | None = None, query_rope: Tensor | None = None,
                               key_rope: Tensor | None = None, sparse_block_size: int = 1, layout_query: str = "BSND",
                               layout_kv: str = "BSND", sparse_mode: int = 3, pre_tokens: int = INT64_MAX,
                               next_tokens: int = INT64_MAX, attention_mode: int = 0, return_softmax_lse: bool = False,
                               sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """torch_npu-npu_sparse_flash_attention, MLA-absorb mode (attention_mode=2, the only documented one):
    scores over [query, query_rope] . [key, key_rope] * scale_value, softmax over the selected KV
    tokens, times value. Selected tokens: for each index b of a row's valid prefix (the page requires
    valid entries first; the first -1 ends the row) the tokens [b*sbs, (b+1)*sbs) below the batch's KV
    length, further limited by rightDownCausal for sparse_mode 3.

    `sinks` (fp32 [N1], routed to aclnnSparseFlashAttentionV2): the page (op-plugin, revised 2026-07/08) documents
    it for Ascend 950 only ("A3/A2: sinks not supported", which the backend applies); its meaning follows
    ops-transformer's golden reference (sparse_flash_attention_golden.py) and DeepSeek-V4: the row maximum
    includes sinks[h], and exp(sinks[h] - max) joins the softmax denominator of head h and nothing else. Query
    heads: the union of 1..128 (Ascend 950) and powers of two (A2/A3).
    """
    op = "npu_sparse_flash_attention"
    if value is None:
        raise _unsupported(op, "value=None (CANN >= 9.2 only)")
    if attention_mode != 2:
        raise _unsupported(op, f"attention_mode={attention_mode} (the page documents only 2, MLA-absorb)")
    if return_softmax_lse:
        raise _unsupported(op, "return_softmax_lse=True (training only)")
    _need(query_rope is not None and key_rope is not None, f"{op}: MLA-absorb mode needs query_rope and key_rope")
    _need(query.dtype in HALF and all(t.dtype == query.dtype for t in (key, value, query_rope, key_rope)),
          f"{op}: query, key, value, query_rope, key_rope must share bf16/fp16")
    _need(query.shape[-1] == 512 and key.shape[-1] == 512 and value.shape[-1] == 512,
          f"{op}: query/key/value head dim must be 512")
    _need(query_rope.shape[-1] == 64 and key_rope.shape[-1] == 64, f"{op}: rope head dim must be 64")
    _need(1 <= query.shape[-2] <= 128 and key.shape[-2] == 1, f"{op}: query heads must be 1..128 and key heads 1")
    _need(sparse_indices.dtype == torch.int32, f"{op}: sparse_indices must be int32")
    _need(1 <= sparse_block_size <= 128 and sparse_block_size & (sparse_block_size - 1) == 0,
          f"{op}: sparse_block_size must be a power of two in [1, 128]")
    _need(sparse_mode in (0, 3), f"{op}: sparse_mode must be 0 or 3")
    _need(pre_tokens == INT64_MAX and next_tokens == INT64_MAX,
          f"{op}: only the default pre_tokens/next_tokens are supported")
    _need(layout_kv == "PA_BSND" or layout_kv == layout_query,
          f"{op}: layout_kv must equal layout_query unless PA_BSND")
    heads = query.shape[-2]
    if sinks is not None:
        _need(sinks.dtype == torch.float32 and tuple(sinks.shape) == (heads,), f"{op}: sinks must be fp32 [{heads}]")
    qs = _split_query(op, query, layout_query, actual_seq_lengths_query)
    qrs = _split_query(op, query_rope, layout_query, actual_seq_lengths_query)
    idxs = _split_query(op, sparse_indices, layout_query, actual_seq_lengths_query)
    split = lambda t: _split_kv(op, t, layout_kv, actual_seq_lengths_kv, block_table, len(qs))  # noqa: E731
    ks, krs, vs = split(key), split(key_rope), split(value)
    results = []
    for q, qr, idx, k, kr, v in zip(qs, qrs, idxs, ks, krs, vs):
        s1, s2 = q.shape[0], k.shape[0]
        idx = idx[:, 0].long()                                                 # [S1, K]
        valid_block = torch.cumprod((idx >= 0).long(), dim=-1).bool()          # the first -1 ends the row
        tok = (idx.clamp(min=0)[..., None] * sparse_block_size + torch.arange(sparse_block_size)).flatten(1)
        valid = valid_block.repeat_interleave(sparse_block_size, dim=1)
        valid &= (tok < s2) & (tok <= _causal_limit(sparse_mode, s1, s2)[:, None])
        tok = tok.clamp(max=max(s2 - 1, 0))
        kfull = torch.cat([k[:, 0], kr[:, 0]], -1).float()                    # [S2, 576]
        qfull = torch.cat([q, qr], -1).float()                                 # [S1, H, 576]
        score = torch.einsum("shd,skd->shk", qfull, kfull[tok]) * scale_value
        score = score.masked_fill(~valid[:, None, :], float("-inf"))
        peak = score.amax(-1, keepdim=True)
        if sinks is not None:
            peak = torch.maximum(peak, sinks[None, :, None])
        peak = peak.masked_fill(torch.isinf(peak), 0.0)
        p = torch.exp(score - peak)
        denom = p.sum(-1, keepdim=True)
        if sinks is not None:
            denom = denom + torch.exp(sinks[None, :, None] - peak)
        out = torch.einsum("shk,skd->shd", p, v[:, 0].float()[tok]) / denom.clamp(min=torch.finfo(torch.float32).tiny)
        results.append(out.to(query.dtype))
    out = _stack_rows(results, layout_query, query.shape[1] if layout_query == "BSND" else 0, 0.0)
    return out, query.new_empty(0, dtype=torch.float32), query.new_empty(0, dtype=torch.float32)


EMULATED = {
    "npu_rms_norm": npu_rms_norm,
    "npu_interleave_rope": npu_interleave_rope,
    "npu_moe_gating_top_k": npu_moe_gating_top_k,
    "npu_grouped_matmul": npu_grouped_matmul,
    "npu_weight_quant_batchmatmul": npu_weight_quant_batchmatmul,
    "npu_mhc_pre": npu_mhc_pre,
    "npu_mhc_post": npu_mhc_post,
    "npu_mhc_sinkhorn": npu_mhc_sinkhorn,
    "npu_lightning_indexer": npu_lightning_indexer,
    "npu_quant_lightning_indexer": npu_quant_lightning_indexer,
    "npu_sparse_flash_attention": npu_sparse_flash_attention,
}
