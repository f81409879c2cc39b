"""The Triton routing kernel (ascend/backends/triton_gate.py) against model.kernels.REFERENCE.gate_topk.

On the GPU when CUDA and triton are present, else on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1);
skipped otherwise. Weights may differ from the reference by float32 rounding only (exp / log1p / sum order).
"""

import pytest
import torch

from ascend.backends import cuda
from model.kernels import REFERENCE

DEVICE = "cuda" if cuda.triton_available() else "cpu"
if not cuda.triton_runs_on(DEVICE):
    pytest.skip("needs triton with a CUDA device, or TRITON_INTERPRET=1", allow_module_level=True)

from ascend.backends import triton_gate  # noqa: E402  (imports triton)


def _logits(n: int, e: int, seed: int = 0) -> torch.Tensor:
    """Distinct logits over softplus's range: strongly negative (log1p of a tiny exp), around 0, above the
    threshold 20 where softplus passes x through."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, e, generator=g) * 4
    z[:, :3] = torch.tensor([-30.0, 21.5, 25.0])
    return z.to(DEVICE)


@pytest.mark.parametrize("n,e,k,biased", [(1, 256, 6, True), (5, 256, 8, False), (3, 72, 6, True), (2, 16, 16, True),
                                          (2, 12, 12, False)])
def test_gate_topk_matches_reference(n, e, k, biased):
    """Same experts in the same order (descending score + bias, as torch.topk gives them) and the same weights, for
    V4's shapes, an expert count that is not a power of two, and k = E (also with padding lanes past E)."""
    logits = _logits(n, e)
    bias = (torch.randn(e, generator=torch.Generator().manual_seed(1)) * 0.5).to(DEVICE) if biased else None
    weights, idx = triton_gate.gate_topk(logits, bias, k, 2.5)
    ref_w, ref_idx = REFERENCE.gate_topk(logits, bias, None, None, k, 2.5)
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


def test_gate_topk_takes_strided_and_batched_inputs():
    """Logits with a row stride (a slice), [B, S, E] logits and a strided bias give the contiguous inputs' result."""
    wide = _logits(6, 2 * 72)
    bias = (torch.randn(144, generator=torch.Generator().manual_seed(3)) * 0.5).to(DEVICE)
    logits, strided_bias = wide[:, :72], bias[::2]
    w, idx = triton_gate.gate_topk(logits, strided_bias, 6, 1.0)
    ref_w, ref_idx = REFERENCE.gate_topk(logits.contiguous(), strided_bias.contiguous(), None, None, 6, 1.0)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
    w3, idx3 = triton_gate.gate_topk(logits.contiguous().view(2, 3, 72), strided_bias, 6, 1.0)
    assert idx3.shape == (2, 3, 6) and torch.equal(idx3.view(6, 6), ref_idx)


def test_gate_topk_nan_logits_pick_distinct_experts_in_range():
    """A row of NaN logits (a broken activation) still names k distinct experts below E, never a padding lane
    past it (which the expert kernels would read as weights); its weights are NaN."""
    logits = _logits(2, 72)
    logits[1] = float("nan")
    w, idx = triton_gate.gate_topk(logits, None, 6, 1.0)
    assert idx[1].unique().numel() == 6 and 0 <= idx[1].min() and idx[1].max() < 72
    assert torch.isnan(w[1]).all() and torch.equal(idx[0], REFERENCE.gate_topk(logits[:1], None, None, None, 6,
                                                                               1.0)[1][0])


def test_gate_topk_ties_go_to_the_lowest_ids():
    """Equal choices: the lowest expert ids, in increasing order, whatever the row's other values."""
    logits = torch.full((2, 32), -1.0, device=DEVICE)
    logits[:, [3, 9, 17, 30]] = 2.0
    logits[1, 0] = 5.0
    weights, idx = triton_gate.gate_topk(logits, None, 3, 1.0)
    assert idx.tolist() == [[3, 9, 17], [0, 3, 9]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, device=DEVICE))


def test_backend_routes_hash_layers_to_the_reference(monkeypatch):
    """The CUDA table's gate_topk: scored layers through the kernel, hash layers (tid2eid) as the reference."""
    calls = []
    scored = cuda.gate_topk_scored
    monkeypatch.setattr(cuda, "gate_topk_scored", lambda *a: calls.append(a[2]) or scored(*a))
    logits = _logits(4, 64)
    tid2eid = torch.randint(0, 64, (100, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ids = torch.tensor([5, 99, 0, 5], device=DEVICE)
    w, idx = cuda.gate_topk_triton(logits, None, tid2eid, ids, 6, 1.5)
    ref_w, ref_idx = REFERENCE.gate_topk(logits, None, tid2eid, ids, 6, 1.5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
    assert calls == []
    w, idx = cuda.gate_topk_triton(logits, None, None, None, 6, 1.5)
    assert calls == [6] and torch.equal(idx, REFERENCE.gate_topk(logits, None, None, None, 6, 1.5)[1])
