"""KV compressor of DeepSeek-V4: one learned, gated pooling of every `ratio` consecutive tokens into one entry.

For block j (tokens [j*ratio, (j+1)*ratio)) and every channel c separately:
    entry_j[c] = sum_t softmax_t(score_t[c]) * kv_t[c],   kv = wkv(x), score = wgate(x) + ape[t % ratio]  (float32)
With ratio 4 (CSA) the projections are 2*d wide and windows overlap: the softmax runs over 8 slots, the 4 tokens
of block j-1 through the first d channels and the 4 tokens of block j through the last d (block -1 is -inf).
Each entry is RMS-normed, rotated at position j*ratio and passed through the quantisation simulation (FP8 on the
non-RoPE dims for the main compressor; Hadamard + FP4 for the indexer's).

An entry exists once its block is complete. A chunk of tokens may start and end anywhere: the tokens of the
unfinished block (and of the previous block for ratio 4) are kept in a `CompressorState` between calls and
re-assembled with the chunk in a block-aligned staging buffer of static size.
"""

from __future__ import annotations

import torch
from torch import nn

from model import kernels as K
from model.cache import CompressorState
from model.config import ModelConfig
from model.linear import JointRows, Linear
from model.norm import RMSNorm
from model.quant import FP4_BLOCK
from model.rope import Rotary

__all__ = ["Compressor", "pool_blocks"]


def pool_blocks(kv: torch.Tensor, score: torch.Tensor, overlap: bool) -> torch.Tensor:
    """Gated pooling of whole blocks. kv, score: float32 [B, n_blocks, ratio, coff * d] -> [B, n_blocks', d].

    Without overlap every block gives one entry. With overlap (coff = 2) entry k pools block k's first d channels
    with block k+1's last d channels, so n_blocks' = n_blocks - 1 (the first block only lends its first half).
    """
    if overlap:
        d = kv.size(-1) // 2
        kv = torch.cat((kv[:, :-1, :, :d], kv[:, 1:, :, d:]), dim=2)
        score = torch.cat((score[:, :-1, :, :d], score[:, 1:, :, d:]), dim=2)
    return (kv * score.softmax(dim=2)).sum(dim=2)


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
        b, s, _ = x.shape
        r, ov = self.ratio, int(self.overlap)
        steps = torch.arange(s, device=x.device)
        pos = start[:, None] + steps
        kv, score = self.joint(x, f32=True)                 # float32 projections of the bf16 weights
        score = score + self.ape[pos % r]

        # staging buffer: blocks (first - ov) .. first + n - 1, starting with the saved state, plus a discard slot
        first = start // r                                  # block of the chunk's first token
        n = (s + r - 1) // r + 1
        size = (ov + n) * r
        width = kv.size(-1)
        stage_kv = torch.cat((state.kv, kv.new_zeros(b, size + 1 - state.kv.size(1), width)), dim=1)
        stage_score = torch.cat((state.score, kv.new_full((b, size + 1 - state.kv.size(1), width), float("-inf"))),
                                dim=1)
        valid = steps < n_valid[:, None]
        slot = torch.where(valid, ov * r + pos - first[:, None] * r, size).unsqueeze(-1).expand(-1, -1, width)
        stage_kv.scatter_(1, slot, kv)
        stage_score.scatter_(1, slot, score)

        pooled = pool_blocks(stage_kv[:, :size].view(b, ov + n, r, width),
                             stage_score[:, :size].view(b, ov + n, r, width), self.overlap)
        entry_ids = first[:, None] + torch.arange(n, device=x.device)
        complete = (entry_ids + 1) * r <= (start + n_valid)[:, None]
        pooled = torch.where(complete.unsqueeze(-1), pooled, 0.0)     # unfinished blocks pooled -inf scores
        entries = self.norm(pooled.to(x.dtype))
        cos, sin = rotary(entry_ids * r)
        entries = self.kernels.rope(entries, cos, sin)
        if self.rotate:
            entries = self.kernels.hadamard(entries)
            if self.quant_sim:
                entries = self.kernels.fp4_round_trip(entries, FP4_BLOCK)
        elif self.quant_sim:
            entries = K.round_kv_entries(self.kernels, entries, self.rope_dim)

        # new state: the block holding the next token (and the one before it for overlap)
        keep = ((start + n_valid) // r - first)[:, None] * r + torch.arange(state.kv.size(1), device=x.device)
        keep = keep.unsqueeze(-1).expand(-1, -1, width)
        state.kv.copy_(stage_kv.gather(1, keep))
        state.score.copy_(stage_score.gather(1, keep))
        return entry_ids, complete, entries
