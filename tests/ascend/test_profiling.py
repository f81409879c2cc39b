"""ascend.profiling.kernel_table on a known step (CUDA only: it reads the device's kernel trace)."""

import pytest
import torch

from ascend.profiling import format_kernel_table, kernel_table


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
