"""The Triton greedy pick (ascend/backends/triton_argmax.py) against torch.argmax (model.kernels.REFERENCE.argmax).

On the GPU when CUDA and triton are present, else on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1);
skipped otherwise. The index must be the same, exactly: the first largest score, a NaN counting as the largest.
"""

import pytest
import torch

from ascend.backends import cuda
from model.kernels import REFERENCE

DEVICE = "cuda" if cuda.triton_available() else "cpu"
if not cuda.triton_runs_on(DEVICE):
    pytest.skip("needs triton with a CUDA device, or TRITON_INTERPRET=1", allow_module_level=True)

from ascend.backends import triton_argmax  # noqa: E402  (imports triton)


def _rows(width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(width)
    nan = torch.randn(3, width, generator=g)
    nan[0, width // 2] = nan[0, -1] = nan[1, 0] = float("nan")           # several NaNs: the first wins
    inf = torch.randn(2, width, generator=g)
    inf[0, -1] = inf[1, width // 3] = float("inf")
    return [torch.randn(4, width, generator=g),                           # distinct scores
            # ties inside and across chunks (at V4's vocabulary 4 rows: each of its 127 chunks already ties)
            torch.randint(0, 3, (16 if width < 4096 else 4, width), generator=g).float(),
            torch.full((2, width), float("-inf")),                        # nothing but -inf: index 0
            nan, inf]


# V4's vocabulary (127 chunks, the last one partial; float32 only: the chunking does not depend on the dtype, and
# it takes ~30 s under the interpreter), one whole chunk, one past it, a prime width, tiny rows
@pytest.mark.parametrize("width,dtype", [(129280, torch.float32)] + [(w, dtype) for w in (1024, 1025, 97, 2, 1)
                                                                     for dtype in (torch.float32, torch.bfloat16)])
def test_argmax_is_torch_argmax(width, dtype):
    for x in _rows(width):
        x = x.to(DEVICE, dtype)
        got = triton_argmax.argmax(x)
        assert got.dtype == torch.int64 and torch.equal(got, REFERENCE.argmax(x)), x


def test_argmax_shapes():
    """Leading dims kept, a row view with a stride read in place, no rows at all."""
    x = torch.randn(2, 3, 2000, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert torch.equal(triton_argmax.argmax(x), x.argmax(-1))
    wide = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1)).to(DEVICE)[:, 500:2500]
    assert torch.equal(triton_argmax.argmax(wide), wide.argmax(-1))
    assert triton_argmax.argmax(torch.empty(0, 50, device=DEVICE)).shape == (0,)
