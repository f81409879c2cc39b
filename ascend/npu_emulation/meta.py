"""Shape-only (Meta) kernels of the emulated operators, so FakeTensor tracing (torch.compile, torch.export, graph
capture planning) sees the same output shapes and dtypes as the real operators' meta functions: every output shape
follows from input shapes and integer arguments alone, which is what makes the NPU path graph-capturable."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _empty(shape, dtype, like: Tensor) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=like.device)


def npu_rms_norm(self, gamma, epsilon=1e-6):
    lead = self.dim() - gamma.dim()
    return torch.empty_like(self), _empty(list(self.shape[:lead]) + [1] * gamma.dim(), torch.float32, self)


def npu_interleave_rope(x, cos, sin):
    return torch.empty_like(x)


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    t = x.shape[0]
    return _empty((t, k), x.dtype, x), _empty((t, k), torch.int32, x), _empty(x.shape, torch.float32, x)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """The single-tensor m-grouped scenario the emulation implements: y [M, N] in x's dtype."""
    return [_empty((x[0].shape[0], weight[0].shape[-1]), x[0].dtype, x[0])]


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                 weight_dtype=None):
    return _empty((x.shape[0], weight.shape[1]), x.dtype, x)


def npu_mhc_pre(x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6, out_flag=0, inner_precise=0):
    lead, n = tuple(x.shape[:-2]), x.shape[-2]
    res = lead + (n, n) if alpha.numel() == 3 else (1,)
    f32 = torch.float32
    return (_empty(lead + (x.shape[-1],), x.dtype, x), _empty(lead + (n,), f32, x), _empty(res, f32, x),
            _empty(lead, f32, x), _empty(lead + (phi.shape[0],), f32, x), _empty(lead + (n,), f32, x))


def npu_mhc_post(x, h_res, h_out, h_post):
    return torch.empty_like(x)


def npu_mhc_sinkhorn(x, *, eps=1e-6, num_iters=20, out_flag=0):
    return torch.empty_like(x), _empty((0,), x.dtype, x), _empty((0,), x.dtype, x)


def _indices(query, key, layout_query, sparse_count):
    """int32 [B, S1, N2, sparse_count] (BSND queries) or [T1, N2, sparse_count] (TND)."""
    rows = tuple(query.shape[:2]) if layout_query == "BSND" else (query.shape[0],)
    return _empty(rows + (key.shape[-2], sparse_count), torch.int32, query)


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=(1 << 63) - 1, next_tokens=(1 << 63) - 1, return_value=False):
    return _indices(query, key, layout_query, sparse_count), _empty((0,), query.dtype, query)


def npu_quant_lightning_indexer(query, key, weights, query_dequant_scale, key_dequant_scale, query_quant_mode,
                                key_quant_mode, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                                block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048,
                                sparse_mode=3, pre_tokens=(1 << 63) - 1, next_tokens=(1 << 63) - 1, query_dtype=None,
                                key_dtype=None):
    return _indices(query, key, layout_query, sparse_count)


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None,
                               sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=3,
                               pre_tokens=(1 << 63) - 1, next_tokens=(1 << 63) - 1, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    return torch.empty_like(query), _empty((0,), torch.float32, query), _empty((0,), torch.float32, query)


META = {name: fn for name, fn in globals().items() if name.startswith("npu_")}
