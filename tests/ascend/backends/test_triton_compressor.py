"""The Triton compressor step (ascend/backends/triton_compressor.py) against `model.kernels.compress_blocks`.

On the GPU when CUDA and triton are present, else on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1);
skipped otherwise. Decode steps run on two copies of one state, reference and kernel: the state must stay equal
exactly (it is only moved), the blocks' ids and flags too, the pooled entries to float32 rounding (the same sums
in another order).
"""

import pytest
import torch

from ascend.backends import cuda
from model.cache import CompressorState
from model.kernels import REFERENCE

DEVICE = "cuda" if cuda.triton_available() else "cpu"
if not cuda.triton_runs_on(DEVICE):
    pytest.skip("needs triton with a CUDA device, or TRITON_INTERPRET=1", allow_module_level=True)

from ascend.backends import triton_compressor  # noqa: E402  (imports triton)


def _state(batch: int, ratio: int, overlap: bool, width: int, start: torch.Tensor, lengths: torch.Tensor,
           g: torch.Generator):
    """A state after a prefill chunk of `lengths` tokens at `start` (reference), as a CompressorState holds it."""
    state = CompressorState.empty(batch, ratio, width, DEVICE)
    kv, score = state.kv, state.score
    chunk = torch.randn(batch, int(lengths.max()), width, generator=g).to(DEVICE)
    REFERENCE.compress_blocks(chunk, torch.randn(chunk.shape, generator=g).to(DEVICE), start, lengths, kv, score,
                              ratio, overlap)
    return kv, score


@pytest.mark.parametrize("ratio,overlap,d", [(4, True, 48), (4, True, 128), (8, False, 40), (6, False, 24),
                                             (128, False, 64)])
def test_decode_steps_equal_the_reference(ratio, overlap, d):
    """Steps crossing at least two block ends in every busy sequence, idle rows (n_valid 0) included, from states
    left mid-block, at a block end and empty; channels that fill no block of the launch (48, 40, 24) and a ratio
    that is not a power of two (6)."""
    g = torch.Generator().manual_seed(ratio + d)
    batch, width = 4, (2 if overlap else 1) * d
    start = torch.tensor([0, 5, ratio - 2, 0], device=DEVICE)
    lengths = torch.tensor([ratio + 1, 3, 2 * ratio + 2, 0], device=DEVICE)
    ref_kv, ref_score = _state(batch, ratio, overlap, width, start, lengths, g)
    kv, score = ref_kv.clone(), ref_score.clone()
    pos = start + lengths
    completed = 0
    for step in range(2 * ratio + 2):
        n_valid = torch.randint(0, 2, (batch,), generator=g).to(DEVICE)
        n_valid[:2] = 1
        new_kv = torch.randn(batch, 1, width, generator=g).to(DEVICE)
        new_score = torch.randn(batch, 1, width, generator=g).to(DEVICE)
        ids, complete, want = REFERENCE.compress_blocks(new_kv, new_score, pos, n_valid, ref_kv, ref_score, ratio,
                                                        overlap)
        got_ids, got_complete, got = triton_compressor.compress_decode(new_kv, new_score, pos, n_valid, kv, score,
                                                                       ratio, overlap)
        assert torch.equal(kv, ref_kv) and torch.equal(score, ref_score), f"state after step {step}"
        assert torch.equal(got_ids, ids) and torch.equal(got_complete, complete)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        completed += int(complete.sum())
        pos = pos + n_valid
    assert completed >= 4


def test_backend_routes_decode_to_the_kernel_and_chunks_to_the_reference(monkeypatch):
    calls = []
    kernel = triton_compressor.compress_decode
    monkeypatch.setattr(triton_compressor, "compress_decode", lambda *a: calls.append(a[0].shape) or kernel(*a))
    g = torch.Generator().manual_seed(0)
    start, n_valid = torch.tensor([3, 9], device=DEVICE), torch.tensor([1, 1], device=DEVICE)
    for s in (1, 5):
        kv, score = (torch.randn(2, s, 16, generator=g).to(DEVICE) for _ in range(2))
        state = _state(2, 4, True, 16, torch.zeros_like(start), start, g)
        states = [state, tuple(t.clone() for t in state)]
        got = cuda.compress_blocks_triton(kv, score, start, n_valid * s, *states[0], 4, True)
        want = REFERENCE.compress_blocks(kv, score, start, n_valid * s, *states[1], 4, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(states[0], states[1]))
    assert calls == [(2, 1, 16)]


def test_custom_op_registration_passes_opcheck():
    """Schema (the state declared as written), fake implementation and dispatch, as torch.library checks them, for a
    token inside its block and one completing it."""
    g = torch.Generator().manual_seed(1)
    start = torch.tensor([0, 0], device=DEVICE)
    for pos in (5, 7):
        for ratio, overlap in ((4, True), (8, False)):
            width = 32 if overlap else 16
            kv, score = (torch.randn(2, 1, width, generator=g).to(DEVICE) for _ in range(2))
            state = _state(2, ratio, overlap, width, start, torch.tensor([pos, pos - 2], device=DEVICE), g)
            at = torch.tensor([pos, pos - 2], device=DEVICE)
            torch.library.opcheck(cuda.compress_decode_triton, (kv, score, at, torch.ones_like(at), *state, ratio,
                                                                overlap))
