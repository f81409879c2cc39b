"""Text generation: batched prefill (optionally in chunks), then one decode step per token with per-sequence stops.

Prompts of different lengths share one batch: they are right-padded and each sequence's real length goes to the
model as `n_valid`, so every sequence keeps its own positions. A sequence that emits a stop token (or reaches
max_new_tokens) is frozen (n_valid 0) while the others continue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ascend.errors import AscendDeployError
from model.cache import KVCache
from model.kernels import REFERENCE, Kernels
from model.transformer import Transformer

__all__ = ["GenerationError", "SamplingParams", "Sampler", "prefill", "decode_step", "generate"]


class GenerationError(AscendDeployError):
    """Sampling settings or prompts that generation cannot use."""


@dataclass
class SamplingParams:
    """temperature <= 0 is greedy; top_k 0 and top_p 1.0 disable those filters; stop_tokens None = [config eos]."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, ok, expected in (("max_new_tokens", self.max_new_tokens >= 0, ">= 0"),
                                   ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                                   ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)")):
            if not ok:
                raise GenerationError(f"sampling option {name} = {getattr(self, name)!r}, expected {expected}")


class Sampler:
    """Picks the next token from float32 logits [B, V]; seedable (one torch.Generator on the logits' device). A
    sampled draw is the exponential race (argmax of probs / Exp(1)): no device sync, and a NaN row gives a token
    rather than an error or a stopped device; the launcher refuses NaN logits itself. Both picks are the argmax of
    `kernels` (the model's table: one launch on CUDA, where torch.argmax is one of the slowest kernels of a batch-1
    step)."""

    def __init__(self, params: SamplingParams, kernels: Kernels = REFERENCE):
        self.params, self.kernels = params, kernels
        self._generator: torch.Generator | None = None

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self._generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.temperature <= 0:
            return self.kernels.argmax(logits)
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.size(-1):
            kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token once the more likely ones already reach top_p (the most likely one always stays)
            drop = probs.cumsum(dim=-1) - probs >= p.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # a draw from probs as the row's largest probs / Exp(1) (exactly the categorical draw): unlike
        # torch.multinomial it cannot stop the device on a NaN row (a device-side assert on CUDA) or wait for it
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self._rng(probs.device))
        return self.kernels.argmax(probs / race)


def check_prompts(prompts: list[list[int]], where: str) -> None:
    """At least one prompt, each of at least one token (an empty one has no last logits to continue from)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError(f"{where}: every prompt needs at least one token")


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache, chunk: int | None = None) -> torch.Tensor:
    """Feed right-padded prompts (in chunks of `chunk` tokens if given) and return each one's last logits [B, V]."""
    check_prompts(prompts, "prefill")
    device = cache.lengths.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    chunk = chunk or width
    last = None
    for at in range(0, width, chunk):
        n_valid = (lengths - at).clamp(0, chunk)
        logits = model(ids[:, at:at + chunk], cache, n_valid=n_valid)
        ends_here = (n_valid > 0) & (at + n_valid == lengths)
        last = logits if last is None else torch.where(ends_here.unsqueeze(-1), logits, last)
    return last


@torch.no_grad()
def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor) -> torch.Tensor:
    """One token per sequence (tokens [B]); inactive sequences neither move nor write. Returns logits [B, V]."""
    return model(tokens.unsqueeze(1), cache, n_valid=active.long())


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | None = None,
             prefill_chunk: int | None = None, cache: KVCache | None = None) -> list[list[int]]:
    """Complete each prompt; returns the new tokens per prompt, without the stop token that ended it."""
    params = params or SamplingParams()
    check_prompts(prompts, "generate")
    stops = params.stop_tokens if params.stop_tokens is not None else (model.config.eos_token_id,)
    if cache is None:
        cache = model.new_cache(len(prompts), max(map(len, prompts)) + params.max_new_tokens)
    sampler = Sampler(params, model.kernels)
    logits = prefill(model, prompts, cache, prefill_chunk)
    device = logits.device
    stop_ids = torch.tensor(list(stops), dtype=torch.long, device=device)
    active = torch.ones(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(params.max_new_tokens):
        tokens = sampler(logits)
        finite = torch.isfinite(logits).all(-1) | ~active      # only live rows count (a token of NaN logits is noise)
        active &= ~torch.isin(tokens, stop_ids)
        # one transfer: the tokens, the rows to keep (still active after their token) and the finite check
        toks, keep, finite = torch.stack((tokens, active.long(), finite.long())).tolist()
        if not all(finite):
            raise GenerationError(f"generate: the model's logits hold NaN or infinite values at new token {step + 1}")
        for b, token in enumerate(toks):
            if keep[b]:
                out[b].append(token)
        if not any(keep) or step == params.max_new_tokens - 1:
            break
        logits = decode_step(model, tokens, cache, active)
    return out
