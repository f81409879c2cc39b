"""Preallocated attention caches of DeepSeek-V4, per layer type, for a fixed (batch, max_len).

What one layer keeps for each sequence in the batch:

* `kv` — the main buffer `[B, window + n_entries + 1, head_dim]` that sparse attention reads directly:
  rows [0, window) are a ring holding token p at row p % window, rows [window, window + n_entries) the compressed
  entries (entry j at row window + j; n_entries = max_len // ratio, 0 for window-only layers), and one last
  "discard" row that absorbs writes a static-shape step must make but nobody may see (padding tokens, blocks not
  yet complete). No index ever points at it.
* `compressor` (ratio > 0) — the raw `wkv` / `wgate` outputs (float32; score with `ape` already added, -inf for
  empty slots) of the block still being filled, and for ratio 4 of the block before it too, because its first
  half-channels overlap into the next entry.
* `index_kv` + `index_compressor` (ratio 4) — the lightning indexer's own compressed keys (index_head_dim wide)
  and its partial-block state.

Entries are stored in the model's dtype (`layout="bf16"`, float32 in CPU tests) or, with `layout="fp8"`, in the
deployment byte layout: a main entry is the FP8 e4m3 non-RoPE dims, the RoPE dims in BF16, one ue8m0 scale per 64
non-RoPE dims, padded to 8 bytes (448 + 128 + 7 + 1 = 584 B for V4); an indexer key is packed FP4 e2m1 (two per
byte, low nibble first) plus one ue8m0 scale per 32 dims (64 + 4 = 68 B). The model's FP8 / FP4 simulations make
those encodings lossless for the quantised dims. Reads of the fp8 layout decode the whole buffer but the
indexer's discard row (a reference path; fused kernels read the bytes directly).

Token positions belong to the caller: `KVCache.lengths` counts the tokens already written per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model.config import ModelConfig
from model.quant import FP8_MAX, FP4_BLOCK, KV_FP8_BLOCK, dequantize_fp4, pow2_scale, quantize_fp4

__all__ = ["CompressorState", "LayerCache", "KVCache", "cache_bytes_per_token", "main_entry_bytes",
           "index_entry_bytes", "encode_main_entries", "decode_main_entries", "encode_index_entries",
           "decode_index_entries"]

Layout = Literal["bf16", "fp8"]


# ----------------------------------------------------------------------------------------------- byte layouts
def main_entry_bytes(head_dim: int, rope_dim: int, layout: Layout) -> int:
    """Bytes of one main KV entry: 2 per dim in bf16; fp8: e4m3 nope + bf16 rope + ue8m0 per 64, padded to 8."""
    if layout == "bf16":
        return 2 * head_dim
    nope = head_dim - rope_dim
    raw = nope + 2 * rope_dim + nope // KV_FP8_BLOCK
    return -(-raw // 8) * 8


def index_entry_bytes(index_dim: int, layout: Layout) -> int:
    """Bytes of one indexer key: 2 per dim in bf16; fp8 layout: packed FP4 (half a byte per dim) + ue8m0 per 32."""
    return 2 * index_dim if layout == "bf16" else index_dim // 2 + index_dim // FP4_BLOCK


def encode_main_entries(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """[..., D] entries -> uint8 [..., main_entry_bytes(D, rope_dim, "fp8")] in the fp8 layout."""
    nope, rope = x[..., :-rope_dim].float(), x[..., -rope_dim:]
    blocks = nope.unflatten(-1, (-1, KV_FP8_BLOCK))
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4), FP8_MAX)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)
    parts = [q.view(torch.uint8), rope.to(torch.bfloat16).contiguous().view(torch.uint8),
             scale.squeeze(-1).to(torch.float8_e8m0fnu).view(torch.uint8)]
    size = main_entry_bytes(x.size(-1), rope_dim, "fp8")
    used = sum(p.size(-1) for p in parts)
    parts.append(torch.zeros(*x.shape[:-1], size - used, dtype=torch.uint8, device=x.device))
    return torch.cat(parts, dim=-1)


def decode_main_entries(raw: torch.Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode_main_entries`: uint8 [..., bytes] -> [..., head_dim] in `dtype`."""
    nope = head_dim - rope_dim
    n_scales = nope // KV_FP8_BLOCK
    q = raw[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    rope = raw[..., nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16)
    scale = raw[..., nope + 2 * rope_dim:nope + 2 * rope_dim + n_scales].contiguous().view(torch.float8_e8m0fnu)
    values = (q.unflatten(-1, (n_scales, KV_FP8_BLOCK)) * scale.float().unsqueeze(-1)).flatten(-2)
    return torch.cat((values.to(dtype), rope.to(dtype)), dim=-1)


def encode_index_entries(x: torch.Tensor) -> torch.Tensor:
    """[..., Di] indexer keys -> uint8 [..., Di/2 + Di/32]: packed e2m1 then ue8m0 scales."""
    packed, scale = quantize_fp4(x)
    return torch.cat((packed.view(torch.uint8), scale.view(torch.uint8)), dim=-1)


def decode_index_entries(raw: torch.Tensor, index_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode_index_entries`."""
    packed = raw[..., :index_dim // 2].contiguous()
    scale = raw[..., index_dim // 2:].contiguous().view(torch.float8_e8m0fnu)
    return dequantize_fp4(packed, scale, dtype=dtype)


# ----------------------------------------------------------------------------------------------- per layer
@dataclass
class CompressorState:
    """Raw per-token compressor inputs of the unfinished block (and, for overlapping ratio 4, the block before).

    kv, score: float32 [B, n_blocks * ratio, coff * d]; slot i holds absolute token (block_start + i) where
    block_start is the first token of the previous (overlap) or current block; score already includes `ape`
    and is -inf in empty slots, kv is 0 there.
    """

    kv: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, device: torch.device | str | None) -> "CompressorState":
        blocks = 2 if ratio == 4 else 1
        kv = torch.zeros(batch, blocks * ratio, width, dtype=torch.float32, device=device)
        return cls(kv=kv, score=torch.full_like(kv, float("-inf")))

    def reset(self, rows: torch.Tensor | slice = slice(None)) -> None:
        """Forget the partial blocks of the given batch rows (a sequence starting afresh)."""
        self.kv[rows] = 0
        self.score[rows] = float("-inf")


def _put_rows(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, rows[b, i]] = values[b, i]. An index_put_ rather than a scatter_: the same values, but a compiler
    (inductor) turns a functionalised index_put_ on a graph input back into an in-place write, while for a scatter_
    it copies the whole buffer first (gigabytes per decode step at 1M tokens)."""
    batch = torch.arange(buffer.size(0), device=buffer.device).unsqueeze(-1)
    buffer.index_put_((batch, rows), values.to(buffer.dtype))


class LayerCache:
    """One attention layer's cache (see the module docstring for the buffers)."""

    def __init__(self, config: ModelConfig, layer_id: int, batch: int, max_len: int, dtype: torch.dtype,
                 layout: Layout = "bf16", device: torch.device | str | None = None):
        self.ratio = config.compress_ratio(layer_id)
        self.window = config.window_size
        self.n_entries = max_len // self.ratio if self.ratio else 0
        self.head_dim, self.rope_dim, self.index_dim = config.head_dim, config.rope_head_dim, config.index_head_dim
        self.dtype, self.layout = dtype, layout
        rows = self.window + self.n_entries + 1
        if layout == "fp8":
            self.kv = torch.zeros(batch, rows, main_entry_bytes(self.head_dim, self.rope_dim, "fp8"),
                                  dtype=torch.uint8, device=device)
        else:
            self.kv = torch.zeros(batch, rows, self.head_dim, dtype=dtype, device=device)
        self.compressor = self.index_kv = self.index_compressor = None
        if self.ratio:
            coff = 2 if self.ratio == 4 else 1
            self.compressor = CompressorState.empty(batch, self.ratio, coff * self.head_dim, device)
        if self.ratio == 4:
            if layout == "fp8":
                self.index_kv = torch.zeros(batch, self.n_entries + 1, index_entry_bytes(self.index_dim, "fp8"),
                                            dtype=torch.uint8, device=device)
            else:
                self.index_kv = torch.zeros(batch, self.n_entries + 1, self.index_dim, dtype=dtype, device=device)
            self.index_compressor = CompressorState.empty(batch, self.ratio, 2 * self.index_dim, device)

    @property
    def discard_row(self) -> int:
        """Row of `kv` that takes writes nobody reads."""
        return self.window + self.n_entries

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the layer's cache holds: main buffer, indexer keys, compressor states (those it has)."""
        states = [st for st in (self.compressor, self.index_compressor) if st is not None]
        return [t for t in (self.kv, self.index_kv) if t is not None] + [t for st in states for t in (st.kv, st.score)]

    # -- main buffer
    def main_kv(self) -> torch.Tensor:
        """The main buffer as [B, rows, head_dim] values (decoded for the fp8 layout)."""
        if self.layout == "fp8":
            return decode_main_entries(self.kv, self.head_dim, self.rope_dim, self.dtype)
        return self.kv

    def write_main(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """kv[b, rows[b, i]] = values[b, i] for rows [B, N] (int64) and values [B, N, head_dim]."""
        if self.layout == "fp8":
            values = encode_main_entries(values, self.rope_dim)
        _put_rows(self.kv, rows, values)

    # -- indexer keys (row j = entry j; row n_entries discards)
    def index_keys(self) -> torch.Tensor:
        """The indexer keys as [B, n_entries, index_dim] values: the discard row after them is left out (never
        visible, it would only lengthen every query's scores and top-k, by one entry past a power of two at the
        power-of-two contexts: 2,049 entries at 8K made the CUDA top-k work on a block of 4,096)."""
        keys = self.index_kv[:, :self.n_entries]
        if self.layout == "fp8":
            return decode_index_entries(keys, self.index_dim, self.dtype)
        return keys

    def write_index(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        if self.layout == "fp8":
            values = encode_index_entries(values)
        _put_rows(self.index_kv, rows, values)

    def reset(self, rows: torch.Tensor | slice = slice(None)) -> None:
        """Make batch rows start a new sequence (stale ring / entry rows are never indexed, so only state resets)."""
        for state in (self.compressor, self.index_compressor):
            if state is not None:
                state.reset(rows)


class KVCache:
    """All layers' caches for a batch of `batch` sequences of up to `max_len` tokens, plus their lengths.

    `layers[i]` is layer i's `LayerCache` (MTP layers follow the main ones, window-only). `lengths` [B] int64 is
    the number of tokens each sequence has in the cache; the caller passes it as the next step's start positions
    and advances it by the valid tokens of the step, keeping every length <= max_len (not checked on the device,
    which would break graph capture).
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 layout: Layout = "bf16", device: torch.device | str | None = None, n_layers: int | None = None):
        n_layers = config.n_layers + config.n_mtp_layers if n_layers is None else n_layers
        self.batch, self.max_len = batch, max_len
        self.layers = [LayerCache(config, i, batch, max_len, dtype, layout, device) for i in range(n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)

    def advance(self, n_tokens: torch.Tensor | int) -> None:
        self.lengths += n_tokens

    def reset(self, rows: torch.Tensor | slice = slice(None)) -> None:
        self.lengths[rows] = 0
        for layer in self.layers:
            layer.reset(rows)

    def nbytes(self) -> int:
        """Bytes held by every buffer of the cache."""
        return self.lengths.nbytes + sum(t.nbytes for layer in self.layers for t in layer.buffers())


# ----------------------------------------------------------------------------------------------- accounting
def cache_bytes_per_token(config: ModelConfig, layout: Layout = "fp8") -> dict[str, float]:
    """KV bytes one more token of context costs, per layer type and in total; allocates nothing.

    Accounting (deepseek-v4.md §3): a layer of ratio r stores one main entry per r tokens, plus for CSA (r = 4)
    one indexer key per 4 tokens; both are charged per token as entry_bytes / r. The sliding window is NOT a
    per-token cost: it is a fixed `window_size` entries per layer per sequence whatever the context, reported
    as `window_bytes_per_sequence`; the float32 partial-block compressor state is likewise fixed and reported as
    `state_bytes_per_sequence`. Window-only layers therefore cost 0 per token. Main layers only (the MTP layer is
    window-only). With layout "fp8" V4-Flash gives ~3.5 KB and V4-Pro ~5.0 KB per token.
    """
    main = main_entry_bytes(config.head_dim, config.rope_head_dim, layout)
    index = index_entry_bytes(config.index_head_dim, layout)
    per_type = {"sliding": 0.0, "csa": 0.0, "hca": 0.0}
    window = state = 0
    for layer_id in range(config.n_layers):
        r = config.compress_ratio(layer_id)
        window += config.window_size * main
        if r == 4:
            per_type["csa"] += (main + index) / r
            state += 2 * r * (2 * config.head_dim + 2 * config.index_head_dim) * 4 * 2   # kv + score, float32
        elif r:
            per_type["hca"] += main / r
            state += r * config.head_dim * 4 * 2
    return {**per_type, "total": sum(per_type.values()),
            "window_bytes_per_sequence": float(window), "state_bytes_per_sequence": float(state)}
