"""The DeepSeek-V4 transformer: embedding -> n hyper-connected blocks (attention + MoE) -> hc head -> logits.

Module paths equal the official checkpoint tensor names (`embed.weight`, `layers.3.attn.wq_b.scale`,
`layers.3.ffn.experts.7.w1.weight`, `hc_head_fn`, `mtp.0.e_proj.weight`, ...), so `load_weights` takes an official
state dict (or a converted rank's shard, or HF-style names, which are mapped) directly.

A forward call processes a chunk of S tokens for each of B sequences against a `KVCache`: sequence b's tokens sit at
positions cache.lengths[b] + s, and only the first n_valid[b] of them are real (right padding). One call with S > 1
is a prefill chunk (prefill may be split into chunks), S == 1 a decode step; the call advances cache.lengths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ascend.errors import AscendDeployError
from model import quant
from model.attention import Attention
from model.cache import KVCache, LayerCache
from model.config import ModelConfig
from model.hyper import HyperConnection, HyperHead, expand_streams
from model.kernels import REFERENCE, Kernels, use_kernels
from model.linear import Linear
from model.moe import MoE
from model.norm import RMSNorm
from model.parallel import ParallelContext

__all__ = ["WeightsError", "ParallelEmbedding", "ParallelHead", "Block", "MTPBlock", "Transformer", "init_random_"]


class WeightsError(AscendDeployError):
    """A state dict that does not fit the model: a missing, unexpected or mis-shaped tensor."""


class LoadResult(NamedTuple):
    """Names the model has but the state dict lacked, and names the model does not have (as torch reports)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class ParallelEmbedding(nn.Module):
    """Token embedding, vocabulary split over tensor-parallel ranks (rows [rank * V/tp, (rank+1) * V/tp))."""

    def __init__(self, vocab_size: int, dim: int, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.part = parallel.split(vocab_size, "vocab_size")
        self.start = parallel.tp_rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight).to(dtype)
        local = ids - self.start
        outside = (local < 0) | (local >= self.part)
        h = F.embedding(local.masked_fill(outside, 0), self.weight).to(dtype)
        return self.parallel.all_reduce_tp(h.masked_fill(outside.unsqueeze(-1), 0))


class ParallelHead(nn.Module):
    """Output projection to the vocabulary in float32 math, the vocabulary split over tensor-parallel ranks and
    gathered. The weight stays BF16, as the checkpoint stores it: the official model widens it to float32 at load,
    which gives the same products (`kernels.f32_linear`) from twice the bytes, and the head is the largest single
    read of a decode step (1 GiB in BF16 at V4's 129,280 x 4,096)."""

    def __init__(self, vocab_size: int, dim: int, parallel: ParallelContext):
        super().__init__()
        self.parallel, self.kernels = parallel, REFERENCE
        self.weight = nn.Parameter(torch.empty(parallel.split(vocab_size, "vocab_size"), dim, dtype=torch.bfloat16),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather_tp(self.kernels.f32_linear(x, self.weight))


class Block(nn.Module):
    """`layers.N`: mHC(attention) then mHC(MoE), each sub-block behind its RMS norm."""

    def __init__(self, layer_id: int, config: ModelConfig, parallel: ParallelContext, kernels: Kernels):
        super().__init__()
        self.layer_id = layer_id
        self.attn = Attention(config, layer_id, parallel, kernels)
        self.ffn = MoE(layer_id, config, parallel, kernels)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.hc_attn = HyperConnection(self, "attn", config, kernels)
        self.hc_ffn = HyperConnection(self, "ffn", config, kernels)

    def forward(self, streams: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor, cache: LayerCache,
                input_ids: torch.Tensor) -> torch.Tensor:
        streams = self.hc_attn(self, streams, lambda x: self.attn(self.attn_norm(x), start, cache, n_valid))
        return self.hc_ffn(self, streams, lambda x: self.ffn(self.ffn_norm(x), input_ids))


class MTPBlock(Block):
    """`mtp.i`: predicts token t + 2 from the main model's streams at t and the embedding of token t + 1.

    x = e_proj(enorm(embed(next ids))) (broadcast over streams) + h_proj(hnorm(streams)), then a window-only Block,
    its own hc head and norm, and the shared head. `embed` / `head` are the main model's (not registered here, so
    the state dict holds them once).
    """

    def __init__(self, layer_id: int, config: ModelConfig, parallel: ParallelContext, kernels: Kernels):
        super().__init__(layer_id, config, parallel, kernels)
        self.e_proj = Linear(config.dim, config.dim, config.dtype)
        self.h_proj = Linear(config.dim, config.dim, config.dtype)
        self.enorm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.hnorm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.norm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.hc_head = HyperHead(self, config, kernels)

    def forward(self, streams: torch.Tensor, embedded: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor,
                cache: LayerCache, input_ids: torch.Tensor) -> torch.Tensor:
        """streams [B, S, n, dim] from the main model, embedded [B, S, dim] = embed(input_ids) -> new streams."""
        x = self.e_proj(self.enorm(embedded)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        return super().forward(x, start, n_valid, cache, input_ids)


class Transformer(nn.Module):
    """DeepSeek-V4 with its MTP block(s); `forward` returns float32 logits."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext | None = None, kernels: Kernels = REFERENCE,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config, self.dtype, self.kernels = config, dtype, kernels
        self.parallel = parallel = parallel or ParallelContext()
        self.embed = ParallelEmbedding(config.vocab_size, config.dim, parallel)
        self.layers = nn.ModuleList(Block(i, config, parallel, kernels) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, kernels)
        self.head = ParallelHead(config.vocab_size, config.dim, parallel)
        self.hc_head = HyperHead(self, config, kernels)
        self.mtp = nn.ModuleList(MTPBlock(config.n_layers + i, config, parallel, kernels)
                                 for i in range(config.n_mtp_layers))
        use_kernels(self, kernels)         # projections too: `Linear` starts at REFERENCE (`kernels.linear`)
        self.set_act_quant(config.act_quant)

    def set_act_quant(self, enabled: bool) -> None:
        """Switch the FP8 activation rounding of fp8 / fp4 projections (default: config.act_quant)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.act_quant = enabled

    def set_quant_sim(self, enabled: bool) -> None:
        """Switch the FP8 KV / FP4 indexer round-trip simulations everywhere (default: config.quant_sim)."""
        quant.set_quant_sim(self, enabled)

    # ------------------------------------------------------------------------------------------- cache
    def new_cache(self, batch: int, max_len: int | None = None, layout: str = "bf16",
                  device: torch.device | str | None = None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens (default config.max_seq_len)."""
        device = device if device is not None else self.head.weight.device
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.dtype, layout, device)

    # ------------------------------------------------------------------------------------------- forward
    def _logits(self, streams: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        """Logits through `owner`'s hc head and norm (the main model's, or an MTP block's) and the shared head."""
        return self.head(owner.norm(owner.hc_head(owner, streams)))

    @staticmethod
    def _last(x: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """x[b, n_valid[b] - 1] for every b, keeping a length-1 sequence dim (position 0 when n_valid is 0)."""
        idx = (n_valid - 1).clamp(min=0).view(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *x.shape[2:])
        return x.gather(1, idx)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, n_valid: torch.Tensor | None = None,
                all_logits: bool = False, return_streams: bool = False):
        """Run a chunk: input_ids [B, S] at positions cache.lengths[b] + s, first n_valid[b] real (default S).

        Returns logits float32 [B, V] at each sequence's last valid token, or [B, S, V] with `all_logits`; with
        `return_streams` also the final residual streams [B, S, hc_mult, dim] (the MTP block's input).
        """
        b, s = input_ids.shape
        if n_valid is None:
            n_valid = torch.full((b,), s, dtype=torch.int64, device=input_ids.device)
        start = cache.lengths.clone()
        streams = expand_streams(self.embed(input_ids, self.dtype), self.config.hc_mult)
        for layer in self.layers:
            streams = layer(streams, start, n_valid, cache.layers[layer.layer_id], input_ids)
        cache.advance(n_valid)
        picked = streams if all_logits else self._last(streams, n_valid)
        logits = self._logits(picked, self)
        logits = logits if all_logits else logits.squeeze(1)
        return (logits, streams) if return_streams else logits

    def forward_mtp(self, streams: torch.Tensor, next_ids: torch.Tensor, cache: KVCache, start: torch.Tensor,
                    n_valid: torch.Tensor | None = None, all_logits: bool = False, depth: int = 0) -> torch.Tensor:
        """Logits of MTP block `depth` for the chunk whose main-model `streams` came from positions start[b] + s;
        next_ids [B, S] are the tokens one position ahead. Uses the MTP layer's own cache (it does not advance
        cache.lengths, which the main forward already did)."""
        b, s = next_ids.shape
        if n_valid is None:
            n_valid = torch.full((b,), s, dtype=torch.int64, device=next_ids.device)
        block = self.mtp[depth]
        embedded = self.embed(next_ids, self.dtype)
        out = block(streams, embedded, start, n_valid, cache.layers[block.layer_id], next_ids)
        picked = out if all_logits else self._last(out, n_valid)
        logits = self._logits(picked, block)
        return logits if all_logits else logits.squeeze(1)

    # ------------------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def load_weights(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> LoadResult:
        """Copy an official-name (or HF-style) state dict into the model; returns the names left out either way.

        Every tensor must have the parameter's exact shape; quantised tensors (fp8 / fp4 bytes / int8 / e8m0
        scales) must have its exact dtype, float tensors are cast (BF16 norms into float32 parameters). With
        `strict`, a missing or unexpected name is an error. Raises `WeightsError` naming the tensor.
        """
        from convert.names import is_hf_style, to_official   # checkpoint naming lives in convert/

        if is_hf_style(state.keys()):
            state = {to_official(k): v for k, v in state.items()}
        own = self.state_dict(keep_vars=True)
        result = LoadResult(sorted(set(own) - set(state)), sorted(set(state) - set(own)))
        for kind, names in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
            if strict and names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                raise WeightsError(f"state dict: {kind} tensor {names[0]}{more}")
        plain = (torch.float32, torch.bfloat16, torch.float16)
        for name, src in state.items():
            dst = own.get(name)
            if dst is None:
                continue
            if tuple(src.shape) != tuple(dst.shape):
                raise WeightsError(f"tensor {name}: shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            castable = (src.dtype in plain and dst.dtype in plain) or (
                src.dtype in (torch.int32, torch.int64) and dst.dtype == torch.int64)
            if src.dtype != dst.dtype and not castable:
                raise WeightsError(f"tensor {name}: dtype {src.dtype}, expected {dst.dtype}")
            self._check_values(name, src)
            dst.copy_(src)
        return result

    def _check_values(self, name: str, src: torch.Tensor) -> None:
        """Values no layer can use, refused at load rather than met as NaN logits or a device-side index error:
        a ue8m0 scale byte 0xFF (NaN), a hash-routing expert id outside [0, n_routed_experts)."""
        if src.dtype == torch.float8_e8m0fnu and bool((src.view(torch.uint8) == 0xFF).any()):
            raise WeightsError(f"tensor {name}: ue8m0 scale byte 0xFF (NaN), expected exponent bytes 0..254")
        if name.endswith(".gate.tid2eid") and src.numel():
            lo, hi = int(src.min()), int(src.max())
            if lo < 0 or hi >= self.config.n_routed_experts:
                raise WeightsError(f"tensor {name}: expert ids {lo}..{hi}, "
                                   f"expected 0..{self.config.n_routed_experts - 1}")

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False) -> LoadResult:
        """torch's entry point, routed through `load_weights` (same checks, `WeightsError`; `assign` unsupported)."""
        if assign:
            raise WeightsError("Transformer.load_state_dict: assign=True is not supported (weights are copied)")
        return self.load_weights(state_dict, strict)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every checkpoint tensor of a V4 model (or of any sub-module) with random values of a plausible scale.

    Linear weights ~ N(0, 1/in) quantised into their format; norm weights ~ 1; hyper-connection `fn` rows scaled
    so the mixes are O(1); gate `bias`, `ape` and hc bases small; `tid2eid` distinct random experts per token.
    Values are drawn on each tensor's own device (fast on a GPU); deterministic for a seed and device.
    """
    generators: dict[torch.device, torch.Generator] = {}

    def randn(t: torch.Tensor, *shape: int, std: float = 1.0) -> torch.Tensor:
        g = generators.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed))
        return torch.randn(shape or t.shape, generator=g, device=t.device) * std

    in_linear = set()
    for module in model.modules():
        if isinstance(module, Linear):
            module.set_from_float(randn(module.weight, module.out_features, module.in_features,
                                        std=module.in_features ** -0.5))
            in_linear.update(id(p) for p in module.parameters())
    for name, t in model.state_dict(keep_vars=True).items():   # checkpoint tensors only (not RoPE tables)
        if id(t) in in_linear:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "tid2eid":
            n_experts = model.get_submodule(name.rsplit(".", 1)[0]).weight.shape[0]
            value = randn(t, t.shape[0], n_experts).argsort(dim=-1)[:, :t.shape[1]]
        elif "norm" in name and leaf == "weight":
            value = 1 + randn(t, std=0.1)
        elif leaf.startswith("hc_") and leaf.endswith("_fn"):
            value = randn(t, std=t.shape[-1] ** -0.5)
        elif leaf.startswith("hc_") and leaf.endswith("_scale"):
            value = 0.5 + randn(t, std=0.2).abs()
        elif name.endswith("embed.weight"):
            value = randn(t)
        elif t.dim() == 2:   # gate and head weights
            value = randn(t, std=t.shape[-1] ** -0.5)
        else:                # attn_sink (1), ape, hc bases and gate bias (0.1)
            value = randn(t, std=0.1 if leaf in ("bias", "ape") or leaf.endswith("_base") else 1.0)
        t.copy_(value)
    return model
