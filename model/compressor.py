"""KV compressor of DeepSeek-V4: one learned, gated pooling of every `ratio` consecutive tokens into one entry.

For block j (tokens [j*ratio, (j+1)*ratio)) and every channel c separately:
    entry_j[c] = sum_t softmax_t(score_t[c]) * kv_t[c],   kv = wkv(x), score = wgate(x) + ape[t % ratio]  (float32)
With ratio 4 (CSA) the projections are 2*d wide and windows overlap: the softmax runs over 8 slots, the 4 tokens
of block j-1 through the first d channels and the 4 tokens of block j through the last d (block -1 is -inf).
Each entry is RMS-normed, rotated at position j*ratio and passed through the quantisation simulation (FP8 on the
non-RoPE dims for the main compressor; Hadamard + FP4 for the indexer's).

An entry exists once its block is complete. A chunk of tokens may start and end anywhere: the tokens of the
unfinished block (and of the previous block for ratio 4) are kept in a `CompressorState` between calls and
re-assembled with the chunk in a block-aligned staging buffer of static size (`kernels.compress_blocks`, which a
backend may replace: the CUDA one pools a decode step's block in place, reading the state only when it completes).
"""

from __future__ import annotations

import torch
from torch import nn

from model import kernels as K
from model.cache import CompressorState
from model.config import ModelConfig
from model.linear import JointRows, Linear
from model.norm import RMSNorm
from model.rope import Rotary

__all__ = ["Compressor"]


class Compressor(JointRows):
    """Compressor of one layer (`attn.compressor`) or of its indexer (`attn.indexer.compressor`, rotate=True);
    wkv and wgate share one tensor and one call (`JointRows`)."""

    joint_names = ("wkv", "wgate")

    def __init__(self, config: ModelConfig, ratio: int, head_dim: int, rotate: bool,
                 kernels: K.Kernels = K.REFERENCE):
        super().__init__()
        self.ratio, self.head_dim, self.rope_dim = ratio, head_dim, config.rope_head_dim
        self.overlap, self.rotate = ratio == 4, rotate
        self.kernels, self.quant_sim = kernels, config.quant_sim
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32), requires_grad=False)
        self.wkv = Linear(config.dim, width, "bf16")
        self.wgate = Linear(config.dim, width, "bf16")
        self.norm = RMSNorm(head_dim, config.norm_eps, kernels)
        self.join_rows(copy=False)

    def forward(self, x: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor, state: CompressorState,
                rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pool the blocks that the chunk completes and carry the unfinished one in `state` (updated in place).

        x: [B, S, dim] chunk, token s of sequence b at position start[b] + s, valid iff s < n_valid[b].
        Returns (entry_ids [B, N] int64, complete [B, N] bool, entries [B, N, head_dim] in x's dtype) for the
        N = ceil(S / ratio) + 1 blocks the chunk may touch; only the `complete` ones are new entries (the others
        are zeros, to be discarded). N depends on S only, so the call is static-shaped.
        """
        pos = start[:, None] + torch.arange(x.size(1), device=x.device)
        kv, score = self.joint(x, f32=True)                 # float32 projections of the bf16 weights
        entry_ids, complete, pooled = self.kernels.compress_blocks(
            kv, score + self.ape[pos % self.ratio], start, n_valid, state.kv, state.score, self.ratio, self.overlap)
        entries = self.norm(pooled.to(x.dtype))
        cos, sin = rotary(entry_ids * self.ratio)
        if self.rotate:                                     # the indexer's keys, rotated as its queries are
            return entry_ids, complete, K.rotate_index(self.kernels, entries, cos, sin, self.quant_sim)
        entries = self.kernels.rope(entries, cos, sin)
        if self.quant_sim:
            entries = K.round_kv_entries(self.kernels, entries, self.rope_dim)
        return entry_ids, complete, entries
