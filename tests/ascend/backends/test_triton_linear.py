"""The unquantised decode projection kernel (ascend/backends/triton_linear.py) against model.kernels.REFERENCE, and
the CUDA backend's rule for taking it.

On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1), on the GPU natively.
"""

import pytest
import torch

from ascend.backends import cuda
from model.kernels import REFERENCE

needs_triton = pytest.mark.skipif(not cuda.triton_available(), reason="needs a CUDA device and triton")
DEVICE = "cuda" if cuda.triton_available() else "cpu"
pytestmark = [pytest.mark.skipif(not cuda.triton_runs_on(DEVICE),
                                 reason="needs triton with a CUDA device, or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("interpreter_bf16")]


def _operands(rows, groups, d_out, d_in, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups, d_in, generator=g)
    w = torch.randn(groups * d_out, d_in, generator=g) * d_in ** -0.5
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype)


def _reference(x, w):
    """Float32 sums of the same (exact) operands: the grouped reference on widened copies."""
    return REFERENCE.grouped_linear(x.float(), w.float(), None, "fp32")


@pytest.mark.parametrize("rows, groups, d_out, d_in, splits", [
    (2, 1, 64, 256, None),            # whole blocks, one split
    (5, 3, 40, 160, None),            # ragged outputs and inputs: the masked loads
    (16, 2, 64, 512, 2),              # an input split, summed by the last split
    (32, 1, 96, 352, 3),              # three splits of 128 inputs, the last 96: ragged blocks in a split
])
def test_matmul_equals_the_reference(rows, groups, d_out, d_in, splits):
    """Plain (G = 1) and grouped projections, with and without input splits: float32 rows to float32 summation
    order, bf16 rows to one bf16 rounding of the same sums."""
    from ascend.backends import triton_linear
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.bfloat16, dict(rtol=2 ** -8, atol=1e-2))):
        x, w = _operands(rows, groups, d_out, d_in, dtype)
        y = triton_linear.matmul(x, w, block_out=32, block_in=64, splits=splits)
        assert y.shape == (rows, groups, d_out) and y.dtype == dtype
        torch.testing.assert_close(y.float(), _reference(x, w), **tol)


def test_matmul_reads_rows_in_place():
    """x as the attention output's group slices (a strided view): read in place, the same result as a copy."""
    from ascend.backends import triton_linear
    x, w = _operands(4, 2, 32, 128, torch.float32)
    wide = torch.zeros(4, 2, 256, device=DEVICE)
    wide[..., 64:192] = x
    view = wide[..., 64:192]
    assert not view.is_contiguous()
    assert torch.equal(triton_linear.matmul(view, w, block_out=32, block_in=64),
                       triton_linear.matmul(x, w, block_out=32, block_in=64))


def test_backend_takes_the_kernel_for_few_bf16_rows_and_outputs(monkeypatch):
    """`cuda.plain_matmul_applies`: bf16 operands, 1 to PLAIN_MATMUL_MAX_ROWS tokens, at most PLAIN_MATMUL_MAX_OUT
    outputs per group; `linear_triton` and `grouped_linear_triton` route exactly those calls to the kernel (a
    plain projection of one row and few outputs: the float32 walk before it), the rest to the reference."""
    rows, out, bf16 = cuda.PLAIN_MATMUL_MAX_ROWS, cuda.PLAIN_MATMUL_MAX_OUT, torch.bfloat16
    assert cuda.plain_matmul_applies(1, out, bf16, bf16) and cuda.plain_matmul_applies(rows, out, bf16, bf16)
    assert not cuda.plain_matmul_applies(rows + 1, out, bf16, bf16)
    assert not cuda.plain_matmul_applies(1, out + 1, bf16, bf16)
    assert not cuda.plain_matmul_applies(1, out, torch.float32, torch.float32)
    assert not cuda.plain_matmul_applies(1, out, bf16, torch.float32)
    calls, walks = [], []
    monkeypatch.setattr(cuda, "plain_matmul_triton", lambda x, w: calls.append(tuple(x.shape)) or
                        REFERENCE.grouped_linear(x, w, None, "bf16"))
    monkeypatch.setattr(cuda, "f32_gemv_triton", lambda x, w: walks.append(tuple(x.shape)) or
                        REFERENCE.f32_linear(x, w))
    monkeypatch.setattr(cuda, "PLAIN_MATMUL_MAX_OUT", 16)            # small shapes for the CPU
    monkeypatch.setattr(cuda, "F32_GEMV_MAX_OUT", 8)
    x, w = _operands(rows, 4, 16, 64, bf16)
    torch.testing.assert_close(cuda.grouped_linear_triton(x.unsqueeze(1), w, None, "bf16"),
                               REFERENCE.grouped_linear(x.unsqueeze(1), w, None, "bf16"))
    torch.testing.assert_close(cuda.linear_triton(x[:, :1], w[:16], None, "bf16"),
                               REFERENCE.linear(x[:, :1], w[:16], None, "bf16"))
    torch.testing.assert_close(cuda.linear_triton(x[:1, :1], w[:16], None, "bf16"),       # one row, 16 outputs
                               REFERENCE.linear(x[:1, :1], w[:16], None, "bf16"))
    assert calls == [(rows, 4, 64), (rows, 1, 64), (1, 1, 64)]
    cuda.linear_triton(torch.zeros(rows + 1, 1, 64, device=DEVICE, dtype=bf16), w[:16], None, "bf16")
    cuda.linear_triton(x[:, :1], w[:32], None, "bf16")                                     # 32 outputs: too many
    cuda.linear_triton(x[:1, :1], w[:8], None, "bf16")                                     # one row, 8: the walk
    assert len(calls) == 3 and walks == [(1, 64)]


@needs_triton
def test_backend_kernel_replays_under_cuda_graph():
    """wo_b (`linear_triton`; its inputs split, the partials summed in the launch) and wo_a (`grouped_linear_triton`)
    at V4-Flash shapes, captured once and replayed with new rows: every replay equals the eager call bit for bit, and
    the reference to bf16 rounding."""
    for rows, groups, d_out, d_in in ((32, 1, 4096, 8192), (8, 8, 1024, 4096)):
        x, w = _operands(rows, groups, d_out, d_in, torch.bfloat16)
        assert cuda.plain_matmul_applies(rows, d_out, x.dtype, w.dtype)
        if groups == 1:
            call = lambda: cuda.linear_triton(x, w, None, "bf16")                       # noqa: E731
        else:
            call = lambda: cuda.grouped_linear_triton(x.unsqueeze(1), w, None, "bf16")  # noqa: E731
        call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for seed in (1, 2):
            x.copy_(_operands(rows, groups, d_out, d_in, torch.bfloat16, seed=seed)[0])
            graph.replay()
            assert torch.equal(out, call())
            ref = _reference(x, w)
            assert ((out.reshape(ref.shape).float() - ref).norm() / ref.norm()).item() < 4e-3
