"""ascend.profiling.kernel_table on a known step (CUDA only: it reads the device's kernel trace)."""

import pytest
import torch

from ascend.profiling import STAND_INS, format_kernel_table, kernel_table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_table_counts_the_kernels_of_a_captured_step():
    x = torch.randn(1024, device="cuda")
    step = lambda: (x * 2).sum()              # noqa: E731 -- two kernels per call
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for fn in (step, graph.replay):            # eager launches and a graph's replayed kernels alike
        table = kernel_table(fn, steps=4)
        assert table["launches_per_step"] == 2 and table["kernel_us_per_step"] > 0
        assert sum(k["calls_per_step"] for k in table["top"]) == 2
        assert format_kernel_table(table, "step").startswith("kernels of one step: 2 launches")


def test_stand_ins_give_the_stage_outputs_shape_from_its_inputs_and_stay_opaque_when_compiled():
    """indexer_topk's stand-in: the first topk visible entries, -1 after them (any valid selection would do; this
    one depends on the inputs, so a compiled step cannot fold it); sparse_attn's: zeros of q's shape. Both run in
    a fullgraph compile as single nodes."""
    q = torch.randn(2, 1, 4, 8)
    pick = STAND_INS["indexer_topk"]
    n_visible = torch.tensor([[3], [10]])
    want = torch.tensor([[[0, 1, 2, -1, -1]], [[0, 1, 2, 3, 4]]], dtype=torch.int32)
    assert torch.equal(pick(q, torch.randn(2, 12, 8), torch.randn(2, 1, 4), n_visible, 5), want)
    attend = STAND_INS["sparse_attn"]
    idx = torch.zeros(2, 1, 5, dtype=torch.int32)
    assert torch.equal(attend(q, torch.randn(2, 12, 8), idx, torch.zeros(4), 0.1), torch.zeros_like(q))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, n: pick(q * 2, q, q, n + 0, 5), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, n_visible), want)
