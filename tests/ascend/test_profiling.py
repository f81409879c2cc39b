"""ascend.profiling: kernel_table on a known step (CUDA only: it reads the device's kernel trace), the stand-ins."""

import dataclasses

import pytest
import torch

from ascend.profiling import STAND_INS, format_kernel_table, kernel_table, with_stand_in
from model import kernels as K


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
    one depends on the inputs, so a compiled step cannot fold it); sparse_attn's: zeros of q's shape. Both are
    custom operators with a fake implementation (opcheck), and a fullgraph compile keeps each as one node whose
    inputs are still computed."""
    q, kv, n_visible = torch.randn(2, 1, 4, 8), torch.randn(2, 12, 8), torch.tensor([[3], [10]])
    weights, idx, sink = torch.randn(2, 1, 4), torch.zeros(2, 1, 5, dtype=torch.int32), torch.zeros(4)
    want = torch.tensor([[[0, 1, 2, -1, -1]], [[0, 1, 2, 3, 4]]], dtype=torch.int32)
    pick, attend = STAND_INS["indexer_topk"], STAND_INS["sparse_attn"]
    assert torch.equal(pick(q, kv, weights, n_visible, 5), want)
    assert torch.equal(attend(q, kv, idx, sink, 0.1), torch.zeros_like(q))
    ops = torch.ops.ascend_profiling
    torch.library.opcheck(ops.no_selection, (q, kv, weights, n_visible, 5))
    torch.library.opcheck(ops.no_attention, (q, kv, idx, sink, 0.1))

    cases = ((ops.no_selection.default, lambda q, kv: pick(q * 2, kv + 1, weights, n_visible, 5), want),
             (ops.no_attention.default, lambda q, kv: attend(q * 2, kv + 1, idx, sink, 0.1), torch.zeros_like(q)))
    for op, fn, out in cases:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm.graph)
            return gm.forward

        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, backend=backend, fullgraph=True)(q, kv), out)
        node = next(n for n in graphs[0].nodes if n.op == "call_function" and n.target is op)
        assert all(a.op == "call_function" for a in node.args[:2])      # q * 2 and kv + 1: computed, not folded


def test_a_stand_in_for_the_selection_clears_the_tables_split_of_it():
    """A table that names its selection's two halves (`Kernels.indexer_scores`, which StreamedDecode runs) would
    bypass an `indexer_topk` stand-in: `with_stand_in` clears them; other stages are replaced alone."""
    split = dataclasses.replace(K.REFERENCE, indexer_scores=K.indexer_scores)
    table = with_stand_in(split, "indexer_topk")
    assert table.indexer_topk is STAND_INS["indexer_topk"] and table.indexer_scores is None
    table = with_stand_in(split, "sparse_attn")
    assert table.sparse_attn is STAND_INS["sparse_attn"] and table.indexer_scores is K.indexer_scores
