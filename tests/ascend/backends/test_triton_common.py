"""What the Triton kernel modules share (ascend/backends/triton_common.py): programmatic dependent launch.

The launch options run anywhere Triton imports; the dependent-launch check needs a CUDA GPU of sm_90 or later.
"""

import pytest
import torch

pytest.importorskip("triton")
from ascend.backends import triton_common  # noqa: E402

needs_pdl = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                               reason="programmatic dependent launch needs a CUDA GPU of sm_90 or later")


def test_launch_options_ask_for_pdl_only_on_a_gpu_that_has_it(monkeypatch):
    assert triton_common.launch_options(torch.device("cpu")) == {}
    if torch.cuda.is_available():
        pdl = torch.cuda.get_device_capability()[0] >= 9
        assert triton_common.launch_options(torch.device("cuda")) == ({"launch_pdl": True} if pdl else {})
        monkeypatch.setattr(triton_common, "PDL", False)
        assert triton_common.launch_options(torch.device("cuda")) == {}


@needs_pdl
def test_a_dependent_kernel_reads_what_the_kernel_before_it_wrote():
    """A long producer (a 256 MB GEMV whose programs all start at once, so under PDL its dependant is scheduled
    right away) and a consumer of its output, captured in one graph and replayed with new inputs: the consumer sees
    this replay's output, not the last one's (it would without `after_previous_kernel`'s wait), bit for bit as the
    two calls made one after another with a sync between."""
    from ascend.backends import triton_moe
    gen = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(32768, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    small = torch.randn(64, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", generator=gen).to(torch.bfloat16)

    def chain():
        return triton_moe.f32_gemv(triton_moe.f32_gemv(x, big).view(8, 4096), small)

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for seed in (1, 2, 3):
        x.copy_(torch.randn(1, 4096, device="cuda", generator=gen.manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        first = triton_moe.f32_gemv(x, big)
        torch.cuda.synchronize()
        assert torch.equal(out, triton_moe.f32_gemv(first.view(8, 4096), small))
