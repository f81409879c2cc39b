"""Ascend NPU backend: the model's `Kernels` with each stage routed to the fused torch_npu operator for it.

Stage -> operator (schemas of torch-npu 2.14.0; semantics from Ascend/op-plugin's torch_npu pages):

    rms_norm      npu_rms_norm
    rope          npu_interleave_rope (its output is in rotate-half layout: we re-interleave the pairs)
    gate_topk     npu_moe_gating_top_k, sigmoid mode fed logit(score / M) so that sqrt-softplus routing comes out
                  exactly (see _Ops.gate_topk); hash layers through its tid2eid / input_ids arguments
    expert_matmul npu_grouped_matmul on the selections sorted by expert (one x, one [E, in, out] weight view,
                  m-axis groups): bf16 / fp16 experts as they are, int8 experts per-channel pseudo-quantised
    linear        int8 projections: npu_weight_quant_batchmatmul (per-channel pseudo-quantised, transposed weight);
                  bf16 / fp16 ones: a plain matmul (the reference); fp8 / fp4 ones fall back (dequantised per call)
    grouped_linear int8 wo_a: npu_grouped_matmul, one group per output group (rows regrouped group-major)
    hc_pre        npu_mhc_pre + npu_mhc_sinkhorn;  hc_post  npu_mhc_post;  sinkhorn  npu_mhc_sinkhorn
    hc_head       npu_mhc_pre with the post rows of phi zeroed (alpha of 2 elements: no res output)
    indexer_topk  npu_lightning_indexer, one TND query per token over a paged (PA_BSND) view of the key cache, so
                  every query gets its own visible count
    sparse_attn   npu_sparse_flash_attention (MLA-absorb mode with zero rope parts, sinks, BSND)

Each operator's documented limits (SoC family, dtypes, head counts, head dims, sparse_count, sinks) are
checked before it is called. A stage whose limits are not met runs the reference for that call and says so with
one logging.warning per (stage, reason). Stages the SoC has no operator for are not replaced at all.
Nothing here has run on an Ascend NPU: it is tested on CPU against ascend.npu_emulation.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from types import ModuleType
from typing import Callable

import torch
import torch.distributed as dist

from ascend.errors import AscendDeployError
from model.kernels import REFERENCE, Kernels

log = logging.getLogger(__name__)
Tensor = torch.Tensor
HALF = (torch.float16, torch.bfloat16)

# SoC families each operator's torch_npu page lists as supported (A5 = Ascend 950 / Atlas 350).
SUPPORTED_SOCS = {
    "npu_rms_norm": {"A2", "A3", "A5", "310P"},
    "npu_interleave_rope": {"A2", "A3", "A5"},
    "npu_moe_gating_top_k": {"A2", "A3", "A5"},  # A5 from ops-transformer's aclnnMoeGatingTopK page
    "npu_grouped_matmul": {"A2", "A3"},          # its torch_npu page (and 310P, fp16 only: not a V4 target)
    "npu_weight_quant_batchmatmul": {"A2", "A3"},  # likewise
    "npu_mhc_pre": {"A5"},
    "npu_mhc_post": {"A5"},
    "npu_mhc_sinkhorn": {"A5"},
    "npu_lightning_indexer": {"A2", "A3", "A5"},
    "npu_sparse_flash_attention": {"A2", "A3", "A5"},
}
STAGE_OPS = {
    "rms_norm": ("npu_rms_norm",),
    "rope": ("npu_interleave_rope",),
    "gate_topk": ("npu_moe_gating_top_k",),
    "expert_matmul": ("npu_grouped_matmul",),
    "linear": ("npu_weight_quant_batchmatmul",),
    "grouped_linear": ("npu_grouped_matmul",),
    "sinkhorn": ("npu_mhc_sinkhorn",),
    "hc_pre": ("npu_mhc_pre", "npu_mhc_sinkhorn"),
    "hc_post": ("npu_mhc_post",),
    "hc_head": ("npu_mhc_pre",),
    "indexer_topk": ("npu_lightning_indexer",),
    "sparse_attn": ("npu_sparse_flash_attention",),
}
GROUPED_EXPERT_FORMATS = ("bf16", "int8")     # the expert formats `expert_matmul` passes to npu_grouped_matmul
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
INDEXER_SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
PAGED_BLOCK_SIZES = (1024, 512, 256, 128, 64, 32, 16)


class NpuBackendError(AscendDeployError):
    """The NPU backend cannot be built here (torch_npu missing)."""


class Fallbacks:
    """Logs each (stage, reason) once; `reasons` keeps them for inspection."""

    def __init__(self) -> None:
        self.reasons: list[tuple[str, str]] = []

    def __call__(self, stage: str, reason: str) -> None:
        if (stage, reason) not in self.reasons:
            self.reasons.append((stage, reason))
            log.warning("npu backend: %s runs the reference implementation: %s", stage, reason)


def _guarded(stage: str, fallbacks: Fallbacks, check: Callable[..., str | None], fast: Callable[..., object]):
    """A kernel that runs `fast` when `check(*args)` returns no reason, else the reference for this call."""
    reference = getattr(REFERENCE, stage)

    def kernel(*args, **kwargs):
        reason = check(*args, **kwargs)
        if reason:
            fallbacks(stage, reason)
            return reference(*args, **kwargs)
        return fast(*args, **kwargs)

    kernel.__name__ = f"npu_{stage}"
    kernel.__doc__ = reference.__doc__
    return kernel


def make_kernels(soc: str, torch_npu: ModuleType | None = None,
                 fallbacks: Fallbacks | None = None) -> Kernels:
    """`Kernels` for an Ascend SoC family ('A2', 'A3', 'A5', ...)."""
    if torch_npu is None:
        try:
            torch_npu = importlib.import_module("torch_npu")
        except Exception as e:  # noqa: BLE001 -- a broken install may raise anything
            raise NpuBackendError(f"the npu backend needs torch_npu: {type(e).__name__}: {e}") from e
    fallbacks = fallbacks or Fallbacks()
    ops = _Ops(torch_npu, soc)
    replaced = {}
    for stage, names in STAGE_OPS.items():
        missing = [n for n in names if soc not in SUPPORTED_SOCS[n]]
        if missing:
            fallbacks(stage, f"{', '.join(missing)} not available on {soc}")
            continue
        reason = ops.static_reason(stage)
        if reason:
            fallbacks(stage, reason)
            continue
        replaced[stage] = _guarded(stage, fallbacks, getattr(ops, f"check_{stage}"), getattr(ops, stage))
    if "expert_matmul" in replaced:
        # npu_grouped_matmul reads each expert once per call, so a prefill chunk's MoE runs static too (one grouped
        # call per projection instead of a host sync and three calls per local expert). Its per-call checks pass
        # for these formats at V4's shapes (<= 1024 experts, dims < 65536) with the bf16 activations the launcher
        # uses on NPUs; a call that failed them would take the reference, whose per-selection weight copies are
        # large at prefill sizes (the fallback is logged).
        replaced["grouped_expert_formats"] = GROUPED_EXPERT_FORMATS
        replaced["group_experts"] = ops.group_experts        # one sort per MoE layer, shared by its calls
    return dataclasses.replace(REFERENCE, **replaced)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_reason(op: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> str | None:
    if t.dtype not in allowed:
        return f"{op} takes {'/'.join(_name(d) for d in allowed)}, got {_name(t.dtype)}"
    return None


class _Ops:
    """The NPU implementation of each stage (`<stage>`) and its per-call limit check (`check_<stage>`)."""

    def __init__(self, torch_npu: ModuleType, soc: str):
        self.npu = torch_npu
        self.soc = soc
        self.floats = (torch.float16, torch.bfloat16, torch.float32) if soc == "A5" else HALF

    def static_reason(self, stage: str) -> str | None:
        # op-plugin's page (revised 2026-07/08, 40912f85 and 4d2c62d6): `sinks` (aclnnSparseFlashAttentionV2) is
        # supported on Ascend 950 only, "A3/A2: sinks not supported"; every V4 attention layer has attn_sink
        if stage == "sparse_attn" and self.soc in ("A2", "A3"):
            return (f"npu_sparse_flash_attention takes no sinks on {self.soc} (V4's attn_sink needs them; "
                    f"Ascend 950 does)")
        return None

    # -------------------------------------------------------------------------------------- rms_norm
    def check_rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> str | None:
        return _dtype_reason("npu_rms_norm", x, (torch.float16, torch.bfloat16, torch.float32))

    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        if weight is None:
            weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        # the page's dtype pairs: gamma in x's dtype, or on A2/A3 an fp32 gamma with a half x (the fp32 norm
        # weights of V4 on bf16 activations); any other pair is normalised in fp32
        if weight.dtype == x.dtype or (weight.dtype == torch.float32 and x.dtype in HALF and self.soc in ("A2", "A3")):
            return self.npu.npu_rms_norm(x, weight, epsilon=eps)[0]
        return self.npu.npu_rms_norm(x.float(), weight.float(), epsilon=eps)[0].to(x.dtype)

    # ------------------------------------------------------------------------------------------ rope
    def check_rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> str | None:
        if 2 * cos.shape[-1] != 64:
            return f"npu_interleave_rope rotates exactly 64 dims, asked for {2 * cos.shape[-1]}"
        return _dtype_reason(f"npu_interleave_rope on {self.soc}", x, self.floats)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
        heads = x.dim() == 4
        part = x[..., -64:]
        part = part.transpose(1, 2) if heads else part.unsqueeze(1)          # [B, N, S, 64]
        if inverse:
            sin = -sin
        # the operator works in rotate-half layout: its tables hold each pair's angle twice
        table = lambda t: torch.cat((t, t), -1).unsqueeze(1).to(x.dtype).contiguous()  # noqa: E731 [B, 1, S, 64]
        out = self.npu.npu_interleave_rope(part.contiguous(), table(cos), table(sin))
        out = torch.stack((out[..., :32], out[..., 32:]), dim=-1).flatten(-2)  # back to interleaved pairs
        out = out.transpose(1, 2) if heads else out.squeeze(1)
        return torch.cat((x[..., :-64], out), dim=-1)

    # ------------------------------------------------------------------------------------- gate_topk
    def check_gate_topk(self, logits: Tensor, bias, tid2eid, input_ids, topk: int, route_scale: float) -> str | None:
        # reasons name the model's sizes, not the token count: Fallbacks logs each reason once, not once per batch
        if logits.dim() != 2 or logits.shape[-1] > 2048:
            return f"npu_moe_gating_top_k takes [N, E<=2048] scores, got {logits.dim()} dims and E = {logits.shape[-1]}"
        if not 1 <= topk <= logits.shape[-1]:
            return f"npu_moe_gating_top_k needs 1 <= k <= {logits.shape[-1]}, got {topk}"
        if logits.shape[-1] <= 2:
            return "npu_moe_gating_top_k needs more than 2 experts"
        return None

    def gate_topk(self, logits: Tensor, bias: Tensor | None, tid2eid: Tensor | None, input_ids: Tensor | None,
                  topk: int, route_scale: float) -> tuple[Tensor, Tensor]:
        # The operator scores with softmax or sigmoid only. V4 scores with s = sqrt(softplus(logits)). Feeding
        # x = logit(s / M) (M = 2 max s, so s / M is in (0, 1/2]) makes its sigmoid return s / M; a bias of
        # bias / M keeps the choice order of s + bias, and the renormalised weights are the same because M
        # cancels in y / sum(y).
        score = torch.nn.functional.softplus(logits.float()).sqrt()
        m = 2 * score.amax().clamp(min=torch.finfo(torch.float32).tiny)
        p = score / m
        x = torch.log(p) - torch.log1p(-p)
        if tid2eid is not None:
            y, idx, _ = self.npu.npu_moe_gating_top_k(x, topk, input_ids=input_ids, tid2eid=tid2eid, norm_type=1,
                                                      routed_scaling_factor=route_scale)
        else:
            y, idx, _ = self.npu.npu_moe_gating_top_k(x, topk, bias=None if bias is None else bias.float() / m,
                                                      norm_type=1, routed_scaling_factor=route_scale)
        return y.float(), idx.long()

    # ---------------------------------------------------------------------------------------- linear
    def _unwired_reason(self, fmt: str) -> str | None:
        if fmt in ("fp8", "fp4"):
            return (f"no {fmt} weight matmul wired on {self.soc}: the weight is dequantised every call "
                    f"(convert with --weights int8 or bf16)")
        return None

    def check_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> str | None:
        if fmt == "int8":
            if x.numel() == 0 or max(weight.shape) > 65535:
                return f"npu_weight_quant_batchmatmul takes non-empty x and K, N <= 65535, got {tuple(weight.shape)}"
            return _dtype_reason("npu_weight_quant_batchmatmul", x, HALF)
        return self._unwired_reason(fmt)

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> Tensor:
        if fmt != "int8":       # bf16 / fp16 / fp32 weights: already one plain matmul
            return REFERENCE.linear(x, weight, scale, fmt)
        y = self.npu.npu_weight_quant_batchmatmul(x.reshape(-1, x.shape[-1]), weight.t(), scale.to(x.dtype))
        return y.view(*x.shape[:-1], weight.shape[0])

    # -------------------------------------------------------------------------------- grouped_linear
    def check_grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> str | None:
        if fmt == "int8":
            if x.numel() == 0:
                return "npu_grouped_matmul takes no empty input"
            if x.shape[-2] > 1024 or max(weight.shape) >= 65536:
                return (f"npu_grouped_matmul takes <= 1024 groups and inner dims < 65536, got {x.shape[-2]} groups "
                        f"and weight {tuple(weight.shape)}")
            return _dtype_reason("npu_grouped_matmul", x, HALF)
        return self._unwired_reason(fmt)

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str) -> Tensor:
        if fmt != "int8":       # bf16 / fp16 / fp32 weights: already one einsum of plain matmuls
            return REFERENCE.grouped_linear(x, weight, scale, fmt)
        *lead, groups, d_in = x.shape
        out = weight.shape[0] // groups
        rows = x.reshape(-1, groups, d_in).transpose(0, 1).reshape(-1, d_in)       # group-major: group g's tokens
        tokens = rows.shape[0] // groups
        ends = torch.arange(1, groups + 1, device=x.device) * tokens
        y = self.npu.npu_grouped_matmul([rows], [weight.view(groups, out, d_in).transpose(1, 2)], group_list=ends,
                                        split_item=3, group_type=0, group_list_type=0,
                                        antiquant_scale=[scale.view(groups, out).to(x.dtype)])[0]
        return y.view(groups, tokens, out).transpose(0, 1).reshape(*lead, groups, out)

    # --------------------------------------------------------------------------------- expert_matmul
    def check_expert_matmul(self, x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str,
                            expert_idx: Tensor, groups: tuple[Tensor, Tensor] | None = None) -> str | None:
        if fmt not in GROUPED_EXPERT_FORMATS:
            return (f"npu_grouped_matmul on {self.soc} takes bf16 / fp16 or int8 (pseudo-quantised) expert weights, "
                    f"not {fmt}: convert with --weights bf16 or int8")
        if fmt == "bf16" and weight.dtype != x.dtype:
            return (f"npu_grouped_matmul multiplies one float dtype, got {_name(x.dtype)} rows and "
                    f"{_name(weight.dtype)} weights")
        if weight.shape[0] > 1024 or max(weight.shape[1:]) >= 65536:
            return f"npu_grouped_matmul takes <= 1024 groups and inner dims < 65536, got weights {tuple(weight.shape)}"
        return _dtype_reason("npu_grouped_matmul", x, HALF)

    def group_experts(self, expert_idx: Tensor, n_experts: int, fmt: str) -> tuple[Tensor, Tensor] | None:
        """`kernels.group_experts` for the formats `expert_matmul` groups: the selections sorted by expert (static
        shapes, no host sync) and the cumulative group ends npu_grouped_matmul takes, computed once for a MoE layer's
        calls (w1 and w3 as one joint stack, then w2). Another rank's selection (id -1) rides with expert 0 (the
        groups must cover every row) and is zeroed by `expert_matmul`."""
        if fmt not in GROUPED_EXPERT_FORMATS:
            return None
        rows = expert_idx.clamp(min=0)
        sorted_rows, order = torch.sort(rows, stable=True)
        ends = torch.searchsorted(sorted_rows, torch.arange(1, n_experts + 1, device=rows.device, dtype=rows.dtype))
        return order, ends.long()

    def expert_matmul(self, x: Tensor, weight: Tensor, scale: Tensor | None, fmt: str, expert_idx: Tensor,
                      groups: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # one grouped matmul over the selections sorted by expert: group e is the rows of expert e
        order, ends = groups or self.group_experts(expert_idx, weight.shape[0], fmt)
        quant = {} if fmt == "bf16" else {"antiquant_scale": [scale.to(x.dtype)]}
        y = self.npu.npu_grouped_matmul([x[order]], [weight.transpose(1, 2)], group_list=ends, split_item=3,
                                        group_type=0, group_list_type=0, **quant)[0]
        out = torch.empty_like(y).index_copy_(0, order, y)
        return torch.where((expert_idx >= 0).unsqueeze(1), out, 0.0)

    # ------------------------------------------------------------------------------------------- mHC
    def _mhc_reason(self, x: Tensor) -> str | None:
        n, d = x.shape[-2], x.shape[-1]
        if n not in (4, 6, 8):
            return f"npu_mhc_* take 4, 6 or 8 streams, got {n}"
        if d % 16 or d > 16384:
            return f"npu_mhc_* need a hidden size that is a multiple of 16 up to 16384, got {d}"
        return _dtype_reason("npu_mhc_pre/post", x, HALF)

    def check_sinkhorn(self, mixes: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float) -> str | None:
        n = math.isqrt(mixes.shape[-1] + 1) - 1
        if n not in (4, 6, 8) or not 1 <= iters <= 100:
            return f"npu_mhc_sinkhorn takes n in 4/6/8 and 1-100 iterations, got n={n} iters={iters}"
        return None

    def sinkhorn(self, mixes: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float):
        n = math.isqrt(mixes.shape[-1] + 1) - 1
        m, scale, base = mixes.float(), scale.float(), base.float()
        pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + eps
        post = 2 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = (m[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
        return pre, post, self._sinkhorn(comb, iters, eps)

    def _sinkhorn(self, comb: Tensor, iters: int, eps: float) -> Tensor:
        flat = comb.reshape(-1, *comb.shape[-2:]).contiguous()                # [T, n, n]
        return self.npu.npu_mhc_sinkhorn(flat, eps=eps, num_iters=iters)[0].view(comb.shape)

    def check_hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float,
                     norm_eps: float) -> str | None:
        if not 1 <= iters <= 100:
            return f"npu_mhc_sinkhorn takes 1-100 iterations, got {iters}"
        return self._mhc_reason(x)

    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, norm_eps: float):
        h_in, h_post, h_res, *_ = self.npu.npu_mhc_pre(x, fn.float(), scale.float(), base.float(),
                                                       norm_eps=norm_eps, hc_eps=eps)
        return h_in, h_post, self._sinkhorn(h_res, iters, eps)

    def check_hc_post(self, y: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> str | None:
        if y.dtype != residual.dtype:
            return f"npu_mhc_post needs h_out in x's dtype, got {y.dtype} and {residual.dtype}"
        return self._mhc_reason(residual)

    def hc_post(self, y: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return self.npu.npu_mhc_post(residual, comb.float(), y, post.float())

    def check_hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float,
                      norm_eps: float) -> str | None:
        return self._mhc_reason(x)

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float) -> Tensor:
        # npu_mhc_pre's pre row is exactly the head's reduction; its post rows are zero-filled and ignored
        n = x.shape[-2]
        phi = torch.cat((fn.float(), fn.new_zeros(n, fn.shape[1], dtype=torch.float32)))
        alpha = torch.cat((scale.float().reshape(1), scale.new_zeros(1, dtype=torch.float32)))
        bias = torch.cat((base.float(), base.new_zeros(n, dtype=torch.float32)))
        return self.npu.npu_mhc_pre(x, phi, alpha, bias, norm_eps=norm_eps, hc_eps=eps)[0]

    # ---------------------------------------------------------------------------------- indexer_topk
    def check_indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, n_visible: Tensor, topk: int,
                           group: dist.ProcessGroup | None = None) -> str | None:
        if group is not None and dist.get_world_size(group) > 1:
            return ("tensor-parallel scores must be summed across ranks before top-k; "
                    "npu_lightning_indexer selects per rank")
        if k.shape[1] == 0:
            return "no keys to index (a cache shorter than one compressed block)"
        if q.shape[-1] != 128:
            return f"npu_lightning_indexer needs head dim 128, got {q.shape[-1]}"
        heads_ok = q.shape[2] in (8, 16, 24, 32, 64) if self.soc == "A5" else q.shape[2] <= 64
        if not heads_ok:
            return f"npu_lightning_indexer on {self.soc} does not take {q.shape[2]} query heads"
        if topk not in INDEXER_SPARSE_COUNTS:
            return f"npu_lightning_indexer sparse_count must be 1-2048 or 3072-8192 in steps of 1024, got {topk}"
        reason = _dtype_reason("npu_lightning_indexer", q, HALF)
        if reason or k.dtype != q.dtype:
            return reason or f"npu_lightning_indexer needs key in the query's dtype, got {_name(k.dtype)}"
        allowed = (q.dtype,) if self.soc == "A5" else (q.dtype, torch.float32)
        return _dtype_reason(f"npu_lightning_indexer weights on {self.soc}", weights, allowed)

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, n_visible: Tensor, topk: int,
                     group: dist.ProcessGroup | None = None) -> Tensor:
        # One TND "sequence" per query token, all reading their batch's key blocks through block_table, so each
        # query's actual key length is its own n_visible (CSA visibility grows by one entry per 4 tokens, which
        # no causal mask mode expresses).
        B, S, H, D = q.shape
        T = k.shape[1]
        pad = -T % 16
        keys = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
        Tp = T + pad
        bs = next(b for b in PAGED_BLOCK_SIZES if Tp % b == 0)
        nb = Tp // bs
        paged = keys.reshape(B * nb, bs, 1, D).contiguous()
        table = (torch.arange(B, device=q.device)[:, None] * nb + torch.arange(nb, device=q.device))
        table = table.repeat_interleave(S, dim=0).to(torch.int32)                # [B*S, nb]
        ends = torch.arange(1, B * S + 1, dtype=torch.int32, device=q.device)
        lengths = n_visible.reshape(-1).clamp(0, T).to(torch.int32)
        idx, _ = self.npu.npu_lightning_indexer(
            q.reshape(B * S, H, D).contiguous(), paged, weights.reshape(B * S, H).contiguous(),
            actual_seq_lengths_query=ends, actual_seq_lengths_key=lengths, block_table=table,
            layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=0)
        return idx.view(B, S, topk)

    # ----------------------------------------------------------------------------------- sparse_attn
    def check_sparse_attn(self, q: Tensor, kv: Tensor, indices: Tensor, sink: Tensor, scale: float) -> str | None:
        if q.shape[-1] != 512:
            return f"npu_sparse_flash_attention needs head dim 512, got {q.shape[-1]}"
        heads, allowed = (range(1, 129), "1-128") if self.soc == "A5" else (SFA_HEADS, "1/2/4/.../128")
        if q.shape[2] not in heads:
            return f"npu_sparse_flash_attention on {self.soc} takes {allowed} query heads per rank, got {q.shape[2]}"
        reason = _dtype_reason("npu_sparse_flash_attention", q, HALF)
        if reason or kv.dtype == q.dtype:
            return reason
        return f"npu_sparse_flash_attention needs kv in q's dtype, got {_name(kv.dtype)}"

    def sparse_attn(self, q: Tensor, kv: Tensor, indices: Tensor, sink: Tensor, scale: float) -> Tensor:
        # MLA-absorb mode scores [q, q_rope] . [k, k_rope]; V4's 512 dims (rope included) go in as the "nope"
        # part with zero rope parts, and K = V is the same tensor. The operator wants every row's valid
        # indices first: sorting descending moves the -1 slots to the end.
        B, S, H, D = q.shape
        key = kv.unsqueeze(2).contiguous()                                    # [B, T, 1, 512]
        idx = torch.sort(indices, dim=-1, descending=True).values.to(torch.int32).unsqueeze(2).contiguous()
        out, _, _ = self.npu.npu_sparse_flash_attention(
            q.contiguous(), key, key, idx, scale,
            query_rope=q.new_zeros(B, S, H, 64), key_rope=kv.new_zeros(B, kv.shape[1], 1, 64),
            sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=0, attention_mode=2,
            sinks=sink.float().contiguous())
        return out
