"""Memory per rank of a DeepSeek-V4 deployment: weights by parallel split, KV cache, workspace.

Weights are counted tensor by tensor from the config (the shapes of deepseek-v4.md and the official
model), in the format a converted checkpoint holds them:

* `keep`: as published: attention (wo_a included, which convert/ keeps in FP8 where the official
  converter dequantises it) / shared-expert / MTP projections FP8 (e4m3 + one ue8m0 byte per 128x128
  block), routed experts FP4 (half a byte + one ue8m0 byte per 32 inputs), the rest BF16 / FP32;
* `bf16`: every projection BF16;  `int8`: every projection INT8 + one FP32 scale per output row.

Tensors model/ keeps in FP32 (ape, mHC, attn_sink, gate bias) are counted at 4 bytes; the head and the
compressors' wkv / wgate at 2 (BF16, as stored and as model/ holds them: their float32 products come from
`kernels.f32_linear`). Tensor parallelism splits wq_b, wo_a, wo_b, attn_sink, the indexer's wq_b and
weights_proj, embed and head; everything else is replicated. Routed experts cost their slots: every
rank holds `slots_per_rank` experts per MoE layer (MTP layers included).

KV cache per sequence = context x bytes per token (per layer type) + a fixed part (128-token window per
layer and the compressors' partial blocks), as `model.cache.cache_bytes_per_token` counts them. Workspace is an estimate: a fixed runtime reserve plus the
activations of one prefill chunk (see docs/planner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ascend.planner.errors import PlanError

__all__ = ["COMPONENTS", "WEIGHT_MODES", "KV_LAYOUTS", "MemorySettings", "linear_bytes", "expert_bytes", "layer_ratios", "weight_formats",
           "weight_bytes", "kv_bytes", "rank_memory", "memory_per_rank"]

COMPONENTS = ("attention", "routed_experts", "shared_expert", "embed_head", "other", "kv_cache", "workspace")
WEIGHT_MODES = ("keep", "bf16", "int8")
KV_LAYOUTS = ("fp8", "bf16")
RUNTIME_RESERVE_BYTES = 2 * 2**30      # default runtime reserve per rank (estimate; hardware entries may set it)
PREFILL_CHUNK_TOKENS = 4096            # prefill tokens per rank per forward (chunked prefill)


@dataclass(frozen=True)
class MemorySettings:
    """What the cache and workspace are sized for."""

    context: int = 131072              # tokens per sequence
    batch: int = 1                     # concurrent sequences over the whole deployment
    weights: str = "keep"              # keep | bf16 | int8
    kv_layout: str = "fp8"             # fp8 (584 B entries) | bf16
    reserve_bytes: int = RUNTIME_RESERVE_BYTES   # runtime, collective buffers, graph pools

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise PlanError(f"--weights {self.weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
        if self.kv_layout not in KV_LAYOUTS:
            raise PlanError(f"kv layout {self.kv_layout!r}: expected one of {', '.join(KV_LAYOUTS)}")
        if self.context < 1 or self.batch < 1:
            raise PlanError(f"--context {self.context} / --batch {self.batch}: expected positive integers")


def linear_bytes(n_out: int, n_in: int, fmt: str) -> int:
    """Bytes of one [n_out, n_in] weight (with its scales) stored as `fmt`."""
    if fmt == "fp8":
        return n_out * n_in + math.ceil(n_out / 128) * math.ceil(n_in / 128)
    if fmt == "fp4":
        return n_out * n_in // 2 + n_out * math.ceil(n_in / 32)
    if fmt == "int8":
        return n_out * n_in + 4 * n_out
    if fmt == "bf16":
        return 2 * n_out * n_in
    if fmt == "fp32":
        return 4 * n_out * n_in
    raise PlanError(f"weight format {fmt!r}: expected fp8, fp4, int8, bf16 or fp32")


def weight_formats(config: Any, weights: str) -> dict[str, str]:
    """Storage format of projections ('proj'), wo_a and routed experts for a weight mode."""
    if weights == "keep":
        return {"proj": config.dtype, "wo_a": config.dtype, "expert": config.expert_dtype}
    if weights in ("bf16", "int8"):
        return {"proj": weights, "wo_a": weights, "expert": weights}
    raise PlanError(f"--weights {weights!r}: expected one of {', '.join(WEIGHT_MODES)}")


def layer_ratios(config: Any) -> list[int]:
    """Compression ratio of every layer that has attention, MTP layers (window-only) last."""
    return list(config.compress_ratios) + [0] * config.n_mtp_layers


def expert_bytes(config: Any, fmt: str) -> int:
    """One expert's w1, w3 ([moe_inter_dim, dim]) and w2 ([dim, moe_inter_dim]) stored as `fmt`."""
    d, inter = config.dim, config.moe_inter_dim
    return 2 * linear_bytes(inter, d, fmt) + linear_bytes(d, inter, fmt)


def kv_bytes(config: Any, layout: str) -> dict[str, Any]:
    """KV cache bytes, from `model.cache.cache_bytes_per_token`: per token (per layer of each type and
    summed over layers) and the fixed part per sequence (windows, compressor state, MTP window)."""
    from model.cache import cache_bytes_per_token, index_entry_bytes, main_entry_bytes

    main = main_entry_bytes(config.head_dim, config.rope_head_dim, layout)
    index = index_entry_bytes(config.index_head_dim, layout)
    c = cache_bytes_per_token(config, layout)
    fixed = c["window_bytes_per_sequence"] + c["state_bytes_per_sequence"]
    fixed += config.n_mtp_layers * config.window_size * main      # the MTP layer is window-only
    ratios = layer_ratios(config)
    return {"entry_bytes": main, "index_entry_bytes": index,
            "per_type": {"window": 0.0, "csa": (main + index) / 4, "hca": main / 128},
            "per_token": c["total"], "per_sequence_fixed": int(fixed),
            "layers": {"window": ratios.count(0), "csa": ratios.count(4), "hca": ratios.count(128)}}


def _attention_layer(config: Any, ratio: int, tp: int, f: dict[str, str]) -> int:
    """One layer's attention weights on one rank."""
    d, q, hd = config.dim, config.q_lora_rank, config.head_dim
    b = linear_bytes(q, d, f["proj"]) + linear_bytes(hd, d, f["proj"])              # wq_a, wkv
    b += linear_bytes(config.n_heads * hd // tp, q, f["proj"])                       # wq_b (split)
    b += linear_bytes(config.o_groups * config.o_lora_rank // tp, config.n_heads * hd // config.o_groups, f["wo_a"])
    b += linear_bytes(d, config.o_groups * config.o_lora_rank // tp, f["proj"])     # wo_b (split in)
    b += 4 * config.n_heads // tp + 2 * (q + hd)                                     # attn_sink, norms
    if ratio:
        coff = 2 if ratio == 4 else 1
        b += 2 * linear_bytes(coff * hd, d, "bf16") + 4 * ratio * coff * hd + 2 * hd  # compressor
    if ratio == 4:
        ih, idim = config.index_n_heads, config.index_head_dim
        b += linear_bytes(ih * idim // tp, q, f["proj"]) + linear_bytes(ih // tp, d, "bf16")
        b += 2 * linear_bytes(2 * idim, d, "bf16") + 4 * 4 * 2 * idim + 2 * idim    # indexer compressor
    return b


def _other_layer(config: Any, layer_id: int, f: dict[str, str]) -> int:
    """Norms, mHC mixing, router (and hash table) of one block: replicated."""
    d, E = config.dim, config.n_routed_experts
    b = 2 * 2 * d                                                                    # attn_norm, ffn_norm
    b += 2 * 4 * (config.n_hc_mix * config.hc_mult * d + config.n_hc_mix + 3)       # hc_{attn,ffn}_*
    b += 2 * E * d                                                                   # gate.weight
    b += 8 * config.vocab_size * config.n_activated_experts if config.is_hash_layer(layer_id) else 4 * E
    return b


def weight_bytes(config: Any, tp: int, slots_per_rank: int, weights: str) -> dict[str, int]:
    """Weight bytes on one rank, by component."""
    f = weight_formats(config, weights)
    d = config.dim
    ratios = layer_ratios(config)
    n_moe = len(ratios)                                        # every block (MTP too) has an MoE
    other = sum(_other_layer(config, i, f) for i in range(n_moe))
    hc_head = 4 * (config.hc_mult * config.hc_mult * d + config.hc_mult + 1)
    other += 2 * d + hc_head                                   # final norm, hc_head
    other += config.n_mtp_layers * (2 * linear_bytes(d, d, f["proj"]) + 3 * 2 * d + hc_head)  # e/h_proj, norms
    return {
        "attention": sum(_attention_layer(config, r, tp, f) for r in ratios),
        "routed_experts": n_moe * slots_per_rank * expert_bytes(config, f["expert"]),
        "shared_expert": n_moe * expert_bytes(config, f["proj"]),
        "embed_head": config.vocab_size // tp * d * (2 + 2),      # embed and head BF16
        "other": other,
    }


def _workspace(config: Any, tp: int, seqs: int, s: MemorySettings) -> int:
    """Runtime reserve + activations of one prefill chunk (estimate, see module docstring)."""
    c = min(PREFILL_CHUNK_TOKENS, s.context)
    k = config.n_activated_experts
    act = c * config.hc_mult * config.dim * 4 * 3                       # mHC streams in / out / mix, FP32
    act += c * (config.n_heads // tp) * config.head_dim * 2 * 3         # q, attention out, wo_a in
    if 4 in config.compress_ratios:
        act += c * (s.context // 4) * 4                                 # indexer scores, FP32
    act += c * k * config.dim * 2 * 2 + c * k * config.moe_inter_dim * 4 * 2   # dispatch/combine, SwiGLU
    act += max(seqs, 1) * config.vocab_size // tp * 4                   # logits
    return s.reserve_bytes + act


def rank_memory(config: Any, tp: int, slots_per_rank: int, seqs: int, s: MemorySettings,
                weights: dict[str, int] | None = None) -> dict[str, int]:
    """Bytes on one rank holding `seqs` sequences, by component (COMPONENTS order)."""
    out = dict(weights or weight_bytes(config, tp, slots_per_rank, s.weights))
    kv = kv_bytes(config, s.kv_layout)
    out["kv_cache"] = int(seqs * (s.context * kv["per_token"] + kv["per_sequence_fixed"]))
    out["workspace"] = _workspace(config, tp, seqs, s)
    return {c: int(out[c]) for c in COMPONENTS}


def memory_per_rank(config: Any, world_size: int, tp: int, slots_per_rank: int,
                    s: MemorySettings) -> list[dict[str, Any]]:
    """Per-rank memory as runs of identical ranks: [{"ranks": [first, last], "bytes": {...}}].

    Sequences are dealt to data-parallel groups round robin, so the first batch % dp groups hold one more.
    """
    dp = world_size // tp
    weights = weight_bytes(config, tp, slots_per_rank, s.weights)
    base, extra = divmod(s.batch, dp)
    runs = []
    if extra:
        runs.append(([0, extra * tp - 1], base + 1))
    runs.append(([extra * tp, world_size - 1], base))
    return [{"ranks": r, "sequences": n, "bytes": rank_memory(config, tp, slots_per_rank, n, s, weights)}
            for r, n in runs if r[0] <= r[1]]
