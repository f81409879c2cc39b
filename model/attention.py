"""DeepSeek-V4 attention: one shared 512-dim K = V vector per token, a sliding window, and (ratio > 0) compressed
entries selected by the lightning indexer (CSA, ratio 4) or all visible ones (HCA, ratio 128).

A call processes a chunk of S tokens per sequence, token s of sequence b at position start[b] + s and valid iff
s < n_valid[b] (padding past it is computed but never stored or attended to). S == 1 is a decode step; S > 1 a
prefill chunk that may start anywhere, earlier tokens coming from the cache. Every shape depends only on
(B, S, cache capacity), so a decode step can be captured as a graph. The forward is five named stages that a
graph-split backend can run separately:

    prolog    q / kv projections, norms, RoPE, FP8 simulation of the window kv
              (= project: wq_a / wkv, q_norm; then queries: wq_b, norm, RoPE; and token_kv: kv norm, RoPE, FP8)
    compress  block pooling of the chunk into new compressed entries (main and indexer), written to the cache
              (= compress_main, and compress_index for CSA)
    select    compressed entries each query attends: indexer top-k (CSA), all visible (HCA), none (ratio 0)
              (CSA: the indexer's queries and weights, then pick: scores and top-k)
    attend    sparse attention over window + selected entries with the per-head sink; window ring update
    epilog    de-rotation of the output's RoPE dims, grouped low-rank output projection wo_a, then wo_b

The finer stages in parentheses are the units that `ascend.backends.streams` runs on concurrent streams at decode.

Rows of the key buffer that sparse attention indexes: [window ring | compressed entries | discard row] from the
cache; a prefill chunk appends its own window kv after those rows (its tokens are written to the ring only after
attention, as writing first could overwrite ring rows that earlier queries of the chunk still need).
"""

from __future__ import annotations

import torch
from torch import nn

from model import kernels as K
from model import quant
from model.cache import LayerCache
from model.compressor import Compressor
from model.config import ModelConfig
from model.indexer import Indexer
from model.linear import ColumnParallelLinear, JointRows, Linear, RowParallelLinear
from model.norm import RMSNorm
from model.parallel import ParallelContext
from model.rope import Rotary

__all__ = ["Attention", "chunk_positions", "window_rows", "visible_entry_rows"]


def window_rows(positions: torch.Tensor, start: torch.Tensor, ring_end: torch.Tensor, window: int,
                chunk_row: int) -> torch.Tensor:
    """Key-buffer rows of each query's window (the `window` tokens ending at the query), int32 [B, S, window].

    Token p lives in ring row p % window if p < ring_end[b] (already in the ring), else in the chunk's own rows
    starting at `chunk_row` (row chunk_row + p - start[b]). Tokens before position 0 are -1.
    """
    keys = positions.unsqueeze(-1) - (window - 1) + torch.arange(window, device=positions.device)
    in_ring = keys < ring_end[:, None, None]
    rows = torch.where(in_ring, keys % window, chunk_row + keys - start[:, None, None])
    return torch.where(keys >= 0, rows, -1).int()


def chunk_positions(x: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor | None = None):
    """(positions [B, S], n_valid [B] int64) of a chunk x [B, S, ...] starting at `start` (all S valid by default)."""
    b, s = x.shape[:2]
    if n_valid is None:
        n_valid = torch.full((b,), s, dtype=torch.int64, device=x.device)
    return start[:, None] + torch.arange(s, device=x.device), n_valid


def visible_entry_rows(positions: torch.Tensor, ratio: int, n_entries: int, first_row: int) -> torch.Tensor:
    """All compressed entries visible to each query (entry t iff t < (p + 1) // ratio) as key-buffer rows
    first_row + t, else -1: int32 [B, S, n_entries] (HCA attends to all of them)."""
    t = torch.arange(n_entries, device=positions.device)
    visible = t < ((positions + 1) // ratio).unsqueeze(-1)
    return torch.where(visible, first_row + t, -1).int()


class Attention(JointRows):
    """`layers.N.attn` of DeepSeek-V4 (sub-module and parameter names are the checkpoint's). wq_a and wkv read
    the same x: they share one tensor and one call (`JointRows`)."""

    joint_names = ("wq_a", "wkv")

    def __init__(self, config: ModelConfig, layer_id: int, parallel: ParallelContext | None = None,
                 kernels: K.Kernels = K.REFERENCE):
        super().__init__()
        self.parallel = parallel = parallel or ParallelContext()
        self.layer_id, self.kernels, self.quant_sim = layer_id, kernels, config.quant_sim
        self.ratio = config.compress_ratio(layer_id)
        self.window, self.head_dim, self.rope_dim = config.window_size, config.head_dim, config.rope_head_dim
        self.n_local_heads = parallel.split(config.n_heads, "n_heads")
        self.n_local_groups = parallel.split(config.o_groups, "o_groups")
        self.eps = config.norm_eps
        self.softmax_scale = config.head_dim ** -0.5

        self.attn_sink = nn.Parameter(torch.empty(self.n_local_heads, dtype=torch.float32), requires_grad=False)
        self.wq_a = Linear(config.dim, config.q_lora_rank, config.dtype)
        self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps, kernels)
        self.wq_b = ColumnParallelLinear(config.q_lora_rank, config.n_heads * config.head_dim, config.dtype, parallel)
        self.wkv = Linear(config.dim, config.head_dim, config.dtype)
        self.kv_norm = RMSNorm(config.head_dim, config.norm_eps, kernels)
        self.wo_a = ColumnParallelLinear(config.n_heads * config.head_dim // config.o_groups,
                                         config.o_groups * config.o_lora_rank, config.dtype, parallel)
        self.wo_b = RowParallelLinear(config.o_groups * config.o_lora_rank, config.dim, config.dtype, parallel)
        self.compressor = Compressor(config, self.ratio, config.head_dim, False, kernels) if self.ratio else None
        self.indexer = Indexer(config, self.ratio, parallel, kernels) if self.ratio == 4 else None
        self.rotary = Rotary.for_layer(config, layer_id)
        self.join_rows(copy=False)

    def set_quant_sim(self, enabled: bool) -> None:
        """Switch the FP8 / FP4 round-trip simulations of this layer (on by default, as in the official model)."""
        quant.set_quant_sim(self, enabled)

    # ------------------------------------------------------------------------------------------- stages
    def prolog(self, x: torch.Tensor, positions: torch.Tensor):
        """-> q [B, S, heads, D] (normed, rotated), qr [B, S, q_lora_rank], kv [B, S, D], cos, sin."""
        qr, kv, cos, sin = self.project(x, positions)
        return self.queries(qr, cos, sin), qr, self.token_kv(kv, cos, sin), cos, sin

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """The prolog's shared part: -> qr (normed), kv (wkv(x) as it comes), cos, sin."""
        cos, sin = self.rotary(positions)
        qr, kv = self.joint(x)                                  # wq_a(x), wkv(x)
        return self.q_norm(qr), kv, cos, sin

    def queries(self, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The query path: wq_b, per-head RMS norm, RoPE -> q [B, S, heads, D]."""
        q = self.wq_b(qr).unflatten(-1, (self.n_local_heads, self.head_dim))
        return self.kernels.rope(self.kernels.rms_norm(q, None, self.eps), cos, sin)

    def token_kv(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The kv path: the tokens' kv as the window stores it (normed, rotated, FP8-rounded non-RoPE dims)."""
        kv = self.kernels.rope(self.kv_norm(kv), cos, sin)
        return K.round_kv_entries(self.kernels, kv, self.rope_dim) if self.quant_sim else kv

    def compress(self, x: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor, cache: LayerCache) -> None:
        """Write the entries of the blocks this chunk completes (main and, for CSA, indexer keys) to the cache."""
        self.compress_main(x, start, n_valid, cache)
        if self.indexer is not None:
            self.compress_index(x, start, n_valid, cache)

    def compress_main(self, x: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor, cache: LayerCache) -> None:
        ids, complete, entries = self.compressor(x, start, n_valid, cache.compressor, self.rotary)
        cache.write_main(torch.where(complete, self.window + ids, cache.discard_row), entries)

    def compress_index(self, x: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor, cache: LayerCache) -> None:
        ids, complete, keys = self.indexer.compressor(x, start, n_valid, cache.index_compressor, self.rotary)
        cache.write_index(torch.where(complete, ids, cache.n_entries), keys)

    def select(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, cache: LayerCache) -> torch.Tensor | None:
        """Key-buffer rows of the compressed entries each query attends, int32 [B, S, K] (-1 = none), or None."""
        if self.ratio == 0:
            return None
        if self.indexer is None:
            return visible_entry_rows(positions, self.ratio, cache.n_entries, self.window)
        return self.entry_rows(self.pick(self.indexer.queries(qr, cos, sin), self.indexer.weights(x), positions,
                                         cache))

    def pick(self, index_q: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
             cache: LayerCache) -> torch.Tensor:
        """CSA's selection from the indexer's queries and head weights: the top-k entries' ids, int32 [B, S, K]
        (-1 = none)."""
        return self.indexer(index_q, weights, positions, cache.index_keys())

    def entry_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Compressed entry ids (-1 = none) as key-buffer rows: the entries follow the window's rows. Apart from
        `pick` so that a compiled attention stage can fuse it with the rows it joins (`StreamedDecode`)."""
        return torch.where(ids >= 0, ids + self.window, -1)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, start: torch.Tensor,
               n_valid: torch.Tensor, entry_rows: torch.Tensor | None, cache: LayerCache) -> torch.Tensor:
        """Sparse attention over window + selected entries; stores the chunk's last window tokens in the ring."""
        s = kv.size(1)
        end = start + n_valid
        steps = torch.arange(s, device=kv.device)
        ring_rows = torch.where((steps < n_valid[:, None]) & (positions >= (end - self.window)[:, None]),
                                positions % self.window, cache.discard_row)
        if s == 1:              # decode: the token joins the ring first and every key is a cache row
            cache.write_main(ring_rows, kv)
            keys, ring_end = cache.main_kv(), start + 1     # (an idle row, n_valid 0, reads stale rows)
        else:                   # prefill chunk: its own tokens are read from rows appended after the cache
            keys, ring_end = torch.cat((cache.main_kv(), kv.to(cache.dtype)), dim=1), start
        rows = window_rows(positions, start, ring_end, self.window, cache.kv.size(1))
        if entry_rows is not None:
            rows = torch.cat((rows, entry_rows), dim=-1)
        o = self.kernels.sparse_attn(q, keys, rows, self.attn_sink, self.softmax_scale)
        if s > 1:
            cache.write_main(ring_rows, kv)
        return o

    def epilog(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Undo the RoPE on the output's last dims, then wo_a per head group (grouped einsum) and wo_b."""
        o = self.kernels.rope(o, cos, sin, inverse=True)
        o = o.flatten(2).unflatten(-1, (self.n_local_groups, -1))              # [B, S, groups, heads/group * D]
        # no act_quant rounding here: the official model runs wo_a as a BF16 einsum, not an FP8 GEMM
        o = self.kernels.grouped_linear(o, self.wo_a.weight, self.wo_a.scale, self.wo_a.fmt)   # [B, S, groups, r]
        return self.wo_b(o.flatten(2))

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, start: torch.Tensor, cache: LayerCache,
                n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, dim], start [B] int64 positions of x[:, 0], n_valid [B] valid tokens (default all S).

        Returns [B, S, dim] (rows past n_valid are unspecified). Writes this chunk's kv, entries and compressor
        state into `cache`; the caller advances its lengths.
        """
        positions, n_valid = chunk_positions(x, start, n_valid)
        q, qr, kv, cos, sin = self.prolog(x, positions)
        if self.ratio:
            self.compress(x, start, n_valid, cache)
        entry_rows = self.select(x, qr, positions, cos, sin, cache)
        o = self.attend(q, kv, positions, start, n_valid, entry_rows, cache)
        return self.epilog(o, cos, sin)
