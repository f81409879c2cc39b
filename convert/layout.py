"""The expected-tensor table: every tensor of the published checkpoint, derived from a ModelConfig.

One `TensorSpec` per tensor with its official name, shape and dtype exactly as published (the
safetensors dtype code), how tensor parallelism splits it, and, for routed experts, which MoE layer
and expert it belongs to. The reader checks a checkpoint against this table before anything is
written; synth writes exactly this table; shard.py decides each rank's slice from it.
"""

from __future__ import annotations

from dataclasses import dataclass

FP8_BLOCK = 128  # FP8 e4m3 weights: one ue8m0 scale per 128x128 block
FP4_BLOCK = 32   # FP4 e2m1 experts: one ue8m0 scale per 32 inputs

# Bytes per element of each safetensors dtype code the V4 checkpoint uses.
DTYPE_BYTES = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}


@dataclass(frozen=True)
class TensorSpec:
    name: str                   # official name
    shape: tuple[int, ...]
    dtype: str                  # safetensors dtype code as published
    split_dim: int | None = None  # tensor-parallel split dimension; None = replicated
    quant: str | None = None    # "fp8" / "fp4": a quantised weight; "fp8_scale" / "fp4_scale": its scale
    layer: int | None = None    # MoE layer id of a routed-expert tensor (MTP layers follow the main ones)
    expert: int | None = None   # logical routed-expert id

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _linear(name: str, out_f: int, in_f: int, fmt: str, split_dim: int | None = None, **kw) -> list[TensorSpec]:
    """A linear's weight (+ scale) in storage format `fmt`.

    fp8: e4m3 + ue8m0 per 128x128 block; fp4: e2m1 packed two per int8 byte + ue8m0 per 32 inputs;
    int8: symmetric per output channel + float32 scale [out]; bf16: no scale.
    """
    if fmt == "bf16":
        return [TensorSpec(f"{name}.weight", (out_f, in_f), "BF16", split_dim, **kw)]
    if fmt == "int8":
        # a dim-1 (row-parallel) split keeps every output channel, so each rank holds the whole scale
        return [TensorSpec(f"{name}.weight", (out_f, in_f), "I8", split_dim, "int8", **kw),
                TensorSpec(f"{name}.scale", (out_f,), "F32", 0 if split_dim == 0 else None, "int8_scale", **kw)]
    if fmt == "fp4":
        return [TensorSpec(f"{name}.weight", (out_f, in_f // 2), "I8", split_dim, "fp4", **kw),
                TensorSpec(f"{name}.scale", (out_f, in_f // FP4_BLOCK), "F8_E8M0", split_dim, "fp4_scale", **kw)]
    return [TensorSpec(f"{name}.weight", (out_f, in_f), "F8_E4M3", split_dim, "fp8", **kw),
            TensorSpec(f"{name}.scale", (_cdiv(out_f, FP8_BLOCK), _cdiv(in_f, FP8_BLOCK)), "F8_E8M0", split_dim,
                       "fp8_scale", **kw)]


def _compressor(p: str, cfg, ratio: int, head_dim: int) -> list[TensorSpec]:
    width = (2 if ratio == 4 else 1) * head_dim  # ratio-4 compressors keep two overlapping halves
    return [TensorSpec(f"{p}.ape", (ratio, width), "F32"),
            *_linear(f"{p}.wkv", width, cfg.dim, "bf16"),
            *_linear(f"{p}.wgate", width, cfg.dim, "bf16"),
            TensorSpec(f"{p}.norm.weight", (head_dim,), "BF16")]


def block_specs(cfg, layer_id: int, prefix: str) -> list[TensorSpec]:
    """Tensors of one block (main layer `layers.N` or MTP block `mtp.i`, whose layer_id is n_layers + i)."""
    d, h, hd = cfg.dim, cfg.n_heads, cfg.head_dim
    hc, mix = cfg.hc_mult, cfg.n_hc_mix
    ratio = cfg.compress_ratio(layer_id)
    q = cfg.dtype  # storage format of attention, shared-expert and MTP projections
    out: list[TensorSpec] = []
    a = f"{prefix}.attn"
    out += [TensorSpec(f"{a}.attn_sink", (h,), "F32", 0),
            *_linear(f"{a}.wq_a", cfg.q_lora_rank, d, q),
            TensorSpec(f"{a}.q_norm.weight", (cfg.q_lora_rank,), "BF16"),
            *_linear(f"{a}.wq_b", h * hd, cfg.q_lora_rank, q, 0),
            *_linear(f"{a}.wkv", hd, d, q),
            TensorSpec(f"{a}.kv_norm.weight", (hd,), "BF16"),
            *_linear(f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups, q, 0),
            *_linear(f"{a}.wo_b", d, cfg.o_groups * cfg.o_lora_rank, q, 1)]
    if ratio:
        out += _compressor(f"{a}.compressor", cfg, ratio, hd)
    if ratio == 4:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        out += [*_linear(f"{a}.indexer.wq_b", ih * ihd, cfg.q_lora_rank, q, 0),
                *_linear(f"{a}.indexer.weights_proj", ih, d, "bf16", 0),
                *_compressor(f"{a}.indexer.compressor", cfg, ratio, ihd)]
    out += [TensorSpec(f"{prefix}.attn_norm.weight", (d,), "BF16"),
            TensorSpec(f"{prefix}.ffn_norm.weight", (d,), "BF16")]
    for sub in ("attn", "ffn"):
        out += [TensorSpec(f"{prefix}.hc_{sub}_fn", (mix, hc * d), "F32"),
                TensorSpec(f"{prefix}.hc_{sub}_base", (mix,), "F32"),
                TensorSpec(f"{prefix}.hc_{sub}_scale", (3,), "F32")]
    f = f"{prefix}.ffn"
    e, inter = cfg.n_routed_experts, cfg.moe_inter_dim
    out.append(TensorSpec(f"{f}.gate.weight", (e, d), "BF16"))
    if cfg.is_hash_layer(layer_id):
        out.append(TensorSpec(f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), "I64"))
    else:
        out.append(TensorSpec(f"{f}.gate.bias", (e,), "F32"))
    shapes = (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d)))
    for x in range(e):
        for w, (o, i) in shapes:
            out += _linear(f"{f}.experts.{x}.{w}", o, i, cfg.expert_dtype, layer=layer_id, expert=x)
    for w, (o, i) in shapes:
        out += _linear(f"{f}.shared_experts.{w}", o, i, q)
    return out


def _hc_head(prefix: str, cfg) -> list[TensorSpec]:
    hc = cfg.hc_mult
    return [TensorSpec(f"{prefix}hc_head_fn", (hc, hc * cfg.dim), "F32"),
            TensorSpec(f"{prefix}hc_head_base", (hc,), "F32"),
            TensorSpec(f"{prefix}hc_head_scale", (1,), "F32")]


def mtp_specs(cfg, i: int) -> list[TensorSpec]:
    p, d = f"mtp.{i}", cfg.dim
    return [*block_specs(cfg, cfg.n_layers + i, p),
            *_linear(f"{p}.e_proj", d, d, cfg.dtype), *_linear(f"{p}.h_proj", d, d, cfg.dtype),
            TensorSpec(f"{p}.enorm.weight", (d,), "BF16"), TensorSpec(f"{p}.hnorm.weight", (d,), "BF16"),
            TensorSpec(f"{p}.norm.weight", (d,), "BF16"), *_hc_head(f"{p}.", cfg)]


def top_specs(cfg) -> list[TensorSpec]:
    v, d = cfg.vocab_size, cfg.dim
    return [TensorSpec("embed.weight", (v, d), "BF16", 0), TensorSpec("head.weight", (v, d), "BF16", 0),
            TensorSpec("norm.weight", (d,), "BF16"), *_hc_head("", cfg)]


def expected_groups(cfg) -> list[list[TensorSpec]]:
    """The table grouped the way the published checkpoint groups files: top-level, one per layer, MTP."""
    groups = [top_specs(cfg)]
    groups += [block_specs(cfg, n, f"layers.{n}") for n in range(cfg.n_layers)]
    groups += [mtp_specs(cfg, i) for i in range(cfg.n_mtp_layers)]
    return groups


def expected_tensors(cfg) -> dict[str, TensorSpec]:
    """Official name -> TensorSpec for every tensor the checkpoint must hold."""
    return {s.name: s for g in expected_groups(cfg) for s in g}
