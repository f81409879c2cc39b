"""generate(): greedy equals an independent full-forward argmax loop, batching and stops per sequence, sampler."""

import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.generate import GenerationError, Sampler, SamplingParams, generate, prefill
from model.kernels import REFERENCE
from model.transformer import Transformer, init_random_

CFG = ModelConfig.preset("tiny", dtype="bf16", expert_dtype="bf16", quant_sim=False)  # see test_transformer.py


@pytest.fixture(scope="module")
def model():
    return init_random_(Transformer(CFG, dtype=torch.float32), 0).eval()


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in (13, 30, 5)]


@torch.no_grad()
def _greedy_by_full_forward(model, prompt, n):
    """Independent: re-run the whole sequence from scratch for every new token."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), model.new_cache(1, len(seq)))
        seq.append(int(logits.argmax(-1)))
    return seq[len(prompt):]


def test_greedy_batch_equals_full_forward_loop(model):
    prompts = _prompts()
    got = generate(model, prompts, SamplingParams(max_new_tokens=6, stop_tokens=()))
    assert [len(g) for g in got] == [6, 6, 6]
    for prompt, tokens in zip(prompts, got):
        assert tokens == _greedy_by_full_forward(model, prompt, 6)
    # chunked prefill gives the same completions
    assert generate(model, prompts, SamplingParams(max_new_tokens=6, stop_tokens=()), prefill_chunk=8) == got


def test_stop_tokens_end_each_sequence_separately(model):
    prompts = _prompts()
    free = generate(model, prompts, SamplingParams(max_new_tokens=6, stop_tokens=()))
    stop = free[1][2]                                   # sequence 1 stops at its third token
    got = generate(model, prompts, SamplingParams(max_new_tokens=6, stop_tokens=(stop,)))
    assert got[1] == free[1][:2]
    for b in (0, 2):                                    # the others run on unless they meet the same token
        want = free[b][:free[b].index(stop)] if stop in free[b] else free[b]
        assert got[b] == want
    eos = generate(model, prompts[:1], SamplingParams(max_new_tokens=6))  # default stop: config eos
    assert CFG.eos_token_id not in eos[0]


def test_sampler_filters_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draw = lambda **kw: Sampler(SamplingParams(temperature=1.0, seed=7, **kw))(logits.expand(4000, -1))
    assert torch.equal(draw(), draw())                                   # seedable
    counts = torch.bincount(draw(), minlength=4).float() / 4000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.75).tolist()) == {0, 1}                     # 0.5 < 0.75 <= 0.8
    assert set(draw(top_p=0.5).tolist()) == {0}
    assert set(draw(top_k=3, top_p=0.9).tolist()) == {0, 1, 2}
    assert torch.equal(Sampler(SamplingParams())(logits), torch.tensor([0]))   # greedy
    nan_row = torch.tensor([[float("nan")] * 4, [0.0, 0.0, 0.0, 30.0]])      # a NaN row leaves the others be
    assert Sampler(SamplingParams(temperature=1.0, seed=7))(nan_row)[1].item() == 3


def test_sampler_picks_with_the_kernels_argmax():
    """Greedy and sampled picks both go through the table's argmax (the CUDA table's is one Triton launch): a table
    whose argmax picks the last index changes both."""
    last = dataclasses.replace(REFERENCE, argmax=lambda s: torch.full(s.shape[:-1], s.size(-1) - 1))
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert Sampler(SamplingParams())(logits).item() == 0
    assert Sampler(SamplingParams(), last)(logits).item() == 2
    assert Sampler(SamplingParams(temperature=1.0, seed=1), last)(logits).item() == 2


def test_sampled_generation_is_reproducible(model):
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.95, seed=3, stop_tokens=())
    assert generate(model, _prompts(), params) == generate(model, _prompts(), params)
    with pytest.raises(GenerationError, match="at least one token"):
        generate(model, [[]], params)
    with pytest.raises(GenerationError, match="prefill: every prompt needs at least one token"):
        prefill(model, [[1, 2], []], model.new_cache(2, 8))
    seen = []
    forward = model.forward
    model.forward = lambda *a, **kw: (seen.append(torch.is_grad_enabled()), forward(*a, **kw))[1]
    try:
        prefill(model, [[1, 2]], model.new_cache(1, 8))
    finally:
        del model.forward
    assert seen == [False]                                                      # runs without autograd
    with torch.no_grad():
        broken = next(p for p in model.parameters() if p.dtype == torch.float32 and p.dim() == 1)
        kept = broken.clone()
        broken.fill_(float("nan"))
    try:
        with pytest.raises(GenerationError, match="logits hold NaN or infinite values at new token 1"):
            generate(model, _prompts(), params)
    finally:
        with torch.no_grad():
            broken.copy_(kept)
    with pytest.raises(GenerationError, match="top_p = 0"):
        SamplingParams(top_p=0)
