"""What the Triton kernel modules share (ascend/backends/triton_common.py): programmatic dependent launch.

The launch options run anywhere Triton imports, the offline compiles wherever Triton's wheel has its ptxas (no GPU);
the dependent-launch check needs a CUDA GPU of sm_90 or later.
"""

import json

import pytest
import torch

pytest.importorskip("triton")
from ascend.backends import triton_common  # noqa: E402
from tests.conftest import run_without_interpreter  # noqa: E402

needs_pdl = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                               reason="programmatic dependent launch needs a CUDA GPU of sm_90 or later")


def test_launch_options_ask_for_pdl_only_on_a_gpu_that_has_it(monkeypatch):
    assert triton_common.launch_options(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available():
        pdl = torch.cuda.get_device_capability()[0] >= 9 and torch.version.hip is None
        want = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
        assert triton_common.launch_options(torch.device("cuda", 0)) == want
        monkeypatch.setattr(triton_common, "PDL", False)
        assert triton_common.launch_options(torch.device("cuda", 0)) == {"PDL": False}


def test_capability_is_nvidias_only(monkeypatch):
    """The compute capability that picks kernels (PDL, the Gluon sparse attention): a CUDA device's own; (0, 0) for
    CPU tensors and for a ROCm device, whose gfx90a (MI250) torch reports as (9, 0), an H100's number."""
    capability = triton_common.capability.__wrapped__          # uncached: each case below asks afresh
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert capability(torch.device("cpu")) == (0, 0)
    monkeypatch.setattr(torch.version, "hip", None)
    assert capability(torch.device("cuda", 0)) == (9, 0)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert capability(torch.device("cuda", 0)) == (0, 0)


# triton_gate's kernel compiled for a target without a GPU (outside the interpreter, which skips the wait), with and
# without PDL: whether it builds, and whether its code waits for the previous kernel
_COMPILE = """
import json
from ascend.backends import triton_gate
from tests.conftest import compile_for
types = dict(logits_ptr="*fp32", bias_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64", route_scale="fp32")
out = {}
for arch, pdl in ((80, False), (89, False), (90, True), (89, True)):
    try:
        ptx = compile_for(triton_gate._gate_topk_kernel, types, arch, K=6, K_P2=8, E_P2=256, PDL=pdl).asm["ptx"]
        out[f"{arch} {pdl}"] = "griddepcontrol.wait" in ptx
    except Exception as e:
        out[f"{arch} {pdl}"] = type(e).__name__
print(json.dumps(out))
"""


def test_kernels_wait_only_when_launched_with_pdl():
    """`griddepcontrol` exists from sm_90 on, and ptxas refuses it for older targets: a kernel compiled without PDL
    (what `launch_options` gives a GPU before Hopper) builds for sm_80 and sm_89 and has no wait; with PDL, for
    sm_90, it waits. (Compiling it in unconditionally cost every GPU before Hopper all of the backend's kernels.)"""
    # the last line: Triton prints a failed build's PTX before it
    built = json.loads(run_without_interpreter("-c", _COMPILE, timeout=300).splitlines()[-1])
    assert built["80 False"] is False and built["89 False"] is False and built["90 True"] is True
    assert built["89 True"] not in (True, False)          # the instruction itself: refused before sm_90


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
