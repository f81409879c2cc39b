"""Offline sm_90 compiles of the backend's Triton kernels, down to the cubin (`tests.conftest.compile_for`; no GPU).

The CPU suite runs the kernels under Triton's interpreter, which executes Python that the GPU compiler may refuse:
a name re-typed inside a branch of an unrolled loop passed the interpreter and failed to compile (a draft of the
top-k). Each case compiles one module's kernels at V4-Flash decode settings, with programmatic dependent launch.
Compiled elsewhere: triton_gate's kernel (test_triton_common, with and without PDL) and triton_moe's per-selection
kernels (tests/scripts/test_kernel_sass.py)."""

import pytest

from tests.conftest import run_without_interpreter

MODULES = {
    "triton_sparse_attn": """
from ascend.backends import triton_sparse_attn as T
bf16 = dict(q_ptr="*bf16", kv_ptr="*bf16", k_ptr="*bf16", out_ptr="*bf16", sink_ptr="*fp32", o_ptr="*fp32",
            m_ptr="*fp32", l_ptr="*fp32", w_ptr="*fp32", scale="fp32")
for single in (False, True):
    for block_k in (32, 64):            # SPARSE_ATTN_CONFIG's, SPARSE_ATTN_BATCH_CONFIG's
        compile_for(T._sparse_attn_partial_kernel, bf16, D=512, D_P2=512, BLOCK_H=16, BLOCK_K=block_k, SINGLE=single,
                    PRECISION="tf32", PDL=True)
for stages in (1, T.MERGE_STAGES):    # the loop over chunks plain and pipelined
    compile_for(T._merge_kernel, bf16, D=512, BLOCK_D=128, BLOCK_H=16, NSPLIT_P2=16, SPLIT_CHUNK=1, STAGES=stages,
                PDL=True)
for block_t, stages in ((64, 3), (128, 1)):     # decode's parts, prefill's program per tile (INDEXER_CONFIG)
    compile_for(T._indexer_scores_kernel, {**bf16, "out_ptr": "*fp32"}, D=128, D_P2=128, H_P2=64, BLOCK_T=block_t,
                PRECISION="tf32", STAGES=stages, PDL=True)
top = dict(scores_ptr="*fp32", cand_ptr="*fp32", state_ptr="*i64")
compile_for(T._topk_row_kernel, top, num_warps=8, BLOCK=4096, PDL=True)     # as `topk` launches them
compile_for(T._topk_row_kernel, top, num_warps=4, BLOCK=2048, PDL=True)
compile_for(T._radix_write_kernel, top, BLOCK=2048, PDL=True)
for shift in (24, 16, 8, 0):
    for compact in (False, True) if shift < 24 else (False,):     # the first byte reads every entry either way
        compile_for(T._radix_pass_kernel, top, SHIFT=shift, BLOCK=2048, P_BLOCK=64, COMPACT=compact, PDL=True)
for compact in (False, True):
    for p_block in (16, 64):            # 16 chunks per row at most by default; 64 with explicit chunks
        compile_for(T._radix_coop_kernel, top, BLOCK=2048, P_BLOCK=p_block, COMPACT=compact, STOP=4, PDL=True)
""",
    "gluon_sparse_attn": """
from tests.conftest import kernel_sass
from ascend.backends import gluon_sparse_attn as G
bf16 = dict(q_ptr="*bf16", kv_ptr="*bf16", out_ptr="*bf16", sink_ptr="*fp32", o_ptr="*fp32", m_ptr="*fp32",
            l_ptr="*fp32", scale="fp32")
for single in (False, True):      # its 16-byte row copies need the 16-aligned pointers and strides a launch sees
    kernel_sass().compile_triton(G._sparse_attn_wgmma_kernel, bf16, dict(D=512, BLOCK_H=64, BLOCK_K=64, SINGLE=single),
                                 num_warps=8, aligned=True, unaligned=("scale",))
""",
    "triton_compressor": """
from ascend.backends import triton_compressor as C
ptrs = dict(kv_ptr="*fp32", score_ptr="*fp32", start_ptr="*i64", n_valid_ptr="*i64", state_kv_ptr="*fp32",
            state_score_ptr="*fp32", ids_ptr="*i64", complete_ptr="*u8", out_ptr="*fp32")
for ratio, overlap, d in ((4, 1, 512), (4, 1, 128), (128, 0, 512)):     # CSA main, CSA indexer, HCA
    compile_for(C._compress_decode_kernel, ptrs, R=ratio, R_P2=ratio, OVERLAP=overlap,
                BLOCK_C=C.block_channels(d, ratio), PDL=True)
""",
    "triton_argmax": """
from ascend.backends import triton_argmax as A
compile_for(A._argmax_kernel, dict(x_ptr="*fp32", part_v_ptr="*fp32", out_ptr="*i64"), BLOCK=A.BLOCK, CHUNKS_P2=128,
            PDL=True)
""",
    "triton_index_rotate": """
from ascend.backends import triton_index_rotate as Q
ptrs = dict(x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", h_ptr="*bf16", out_ptr="*bf16")
for fp4_block in (32, 0):
    compile_for(Q._index_rotate_kernel, ptrs, D=128, ROPE=64, FP4_BLOCK=fp4_block, BLOCK_R=Q.BLOCK_R, PRECISION="tf32",
                PDL=True)
""",
    "triton_moe": """
from ascend.backends import triton_moe as E
grouped = dict(x_ptr="*bf16", w_ptr="*u8", s_ptr="*u8", y_ptr="*bf16", part_ptr="*fp32")
for splits in (1, 4):                   # routed experts, and a projection split over its inputs
    compile_for(E._fp4_grouped_kernel, grouped, BLOCK_OUT=64, BLOCK_M=16, BLOCK_IN=128, PRECISION="tf32",
                SPLITS=splits, PDL=True)
    compile_for(E._fp8_grouped_kernel, {**grouped, "w_ptr": "*fp8e4nv"}, BLOCK_OUT=64, BLOCK_M=16, BLOCK_IN=128,
                PRECISION="tf32", SPLITS=splits, PDL=True)
""",
    "triton_linear": """
from ascend.backends import cuda, triton_linear as L
ptrs = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", part_ptr="*fp32")
config = cuda.PLAIN_MATMUL_CONFIG
for splits, block_m in ((1, 16), (2, 32)):      # wo_a at batch 8, wo_b at batch 32
    compile_for(L._matmul_kernel, ptrs, num_warps=config["num_warps"], BLOCK_OUT=config["block_out"], BLOCK_M=block_m,
                BLOCK_IN=config["block_in"], SPLITS=splits, EVEN=True, PRECISION="tf32", PDL=True)
""",
    "triton_mhc": """
from ascend.backends import triton_mhc as M
f32 = dict(x_ptr="*bf16", y_ptr="*bf16", res_ptr="*bf16", out_ptr="*bf16", fn_ptr="*fp32", part_ptr="*fp32",
           scale_ptr="*fp32", base_ptr="*fp32", post_ptr="*fp32", comb_ptr="*fp32", eps="fp32", norm_eps="fp32")
pre = M.PRE_CONFIG
compile_for(M._hc_partials_kernel, f32, M_PAD=32, BLOCK_K=pre["block_k"], BLOCK_T=pre["block_t"], PDL=True)
for sinkhorn in (True, False):          # hc_pre, hc_head
    compile_for(M._hc_mix_kernel, f32, N=4, N_PAD=4, KB_CHUNK=pre["kb_chunk"], BLOCK_D=pre["block_d"],
                SINKHORN=sinkhorn, PDL=True)
compile_for(M._hc_post_kernel, f32, N=4, N_PAD=4, BLOCK_D=M.POST_CONFIG["block_d"], PDL=True)
""",
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_kernels_compile_for_sm90(module):
    pytest.importorskip("triton")
    run_without_interpreter("-c", "from tests.conftest import compile_for\n" + MODULES[module])


def test_wgmma_sparse_attention_computes_each_tiles_scores_once():
    """The Gluon kernel's point (ascend/backends/gluon_sparse_attn.py): per 64-key tile each warpgroup issues 32
    `HGMMA.64x32x16` for the scores (its 32 keys over 512 dims) and 4 `HGMMA.64x256x16` for its half of the output,
    where the Triton kernel's warpgroups each issue 64 for the scores (both compute all 64 keys: compiled beside it
    here); no spills, and its shared memory within an sm_90 program's 227 KiB."""
    pytest.importorskip("triton")
    out = run_without_interpreter("-c", """
from collections import Counter
from tests.conftest import kernel_sass
from ascend.backends import gluon_sparse_attn as G, triton_sparse_attn as T
tools = kernel_sass()
bf16 = dict(q_ptr="*bf16", kv_ptr="*bf16", out_ptr="*bf16", sink_ptr="*fp32", o_ptr="*fp32", m_ptr="*fp32",
            l_ptr="*fp32", scale="fp32")
shape = dict(D=512, BLOCK_H=64, BLOCK_K=64, SINGLE=False)
for name, kernel, extra, stages in (("gluon", G._sparse_attn_wgmma_kernel, {}, None),     # as sparse_attn launches them
                                    ("triton", T._sparse_attn_partial_kernel,
                                     dict(D_P2=512, PRECISION="tf32", PDL=True), 2)):
    compiled = tools.compile_triton(kernel, bf16, shape | extra, num_warps=8, aligned=True, unaligned=("scale",),
                                    num_stages=stages)
    sass, registers = tools.disassemble(compiled)
    lo, hi = tools.loop_span(sass)
    mma = Counter(shape for at, shape in tools.HGMMA.findall(sass) if lo <= int(at, 16) <= hi)
    print(name, mma["64x32x16"], mma["64x256x16"], sass.count("STL"), compiled.metadata.shared)
""")
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.strip().splitlines()}
    assert rows["gluon"][:3] == [32, 4, 0] and rows["gluon"][3] <= 227 << 10
    assert rows["triton"][:2] == [64, 4]


def test_one_program_top_k_runs_its_steps_as_a_loop():
    """The one-program top-k's 16 two-bit steps are a loop, not unrolled: 2,328 sm_90 instructions here (2,048
    entries, 4 warps as `topk` launches them, unaligned arguments), 5,800 unrolled (`tl.static_range`; an ad-hoc
    edit compiled here; at 8 warps 1,528 against 3,680). Unrolled code cost the compiled CSA
    decode step at 8K 10-19 us on the H200 once, though the kernel alone ran as fast (its byte-histogram
    predecessor: 4,720 instructions against 2,104 as a loop; docs/performance.md). A form that unrolls them again
    fails here."""
    pytest.importorskip("triton")
    out = run_without_interpreter("-c", """
from tests.conftest import compile_for, kernel_sass
from ascend.backends import triton_sparse_attn as T
tools = kernel_sass()
sass, _ = tools.disassemble(compile_for(T._topk_row_kernel, {"scores_ptr": "*fp32"}, num_warps=4, BLOCK=2048, PDL=True))
print(sum(tools.opcodes(sass).values()))
""")
    assert int(out.split()[-1]) < 3000
