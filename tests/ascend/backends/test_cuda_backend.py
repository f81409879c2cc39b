"""The CUDA backend's stages against model.kernels.REFERENCE.

The PyTorch implementations run everywhere (CPU here); the Triton ones only with CUDA + Triton.
"""

import copy
import dataclasses

import pytest
import torch

from ascend.backends import cuda
from model import quant
from model.kernels import REFERENCE, select_topk

needs_triton = pytest.mark.skipif(not cuda.triton_available(), reason="needs a CUDA device and triton")
# Triton kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), or on the GPU when there is one
TRITON_DEVICE = "cuda" if cuda.triton_available() else "cpu"
needs_triton_or_interpreter = pytest.mark.skipif(not cuda.triton_runs_on(TRITON_DEVICE),
                                                 reason="needs triton with a CUDA device, or TRITON_INTERPRET=1")


def _attn_inputs(B, S, H, D, T, K, device="cpu", dtype=torch.float32):
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    kv = torch.randn(B, T, D, device=device, dtype=dtype)
    idx = torch.randint(0, T, (B, S, K), device=device, dtype=torch.int32)
    idx[torch.rand(B, S, K, device=device) < 0.3] = -1     # empty slots anywhere, duplicates allowed
    if B * S > 1:
        idx[0, 0] = -1                                     # a query with nothing to attend: zeros
    sink = torch.randn(H, device=device)
    return q, kv, idx, sink


def _indexer_inputs(B, S, H, D, T, device="cpu", dtype=torch.float32):
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, D, device=device, dtype=dtype)
    w = torch.randn(B, S, H, device=device, dtype=dtype)
    n_visible = torch.randint(0, T + 1, (B, S), device=device)
    n_visible[0, 0] = 0
    n_visible[-1, -1] = T
    return q, k, w, n_visible


def _picked_scores(q, k, w, n_visible, idx):
    """Reference scores of the picked entries, sorted, with -inf for -1 slots: equal iff the same set was chosen
    (robust to ties and to ordering)."""
    s = torch.einsum("bshd,btd->bsht", q.double(), k.double()).relu() * w.double().unsqueeze(-1)
    s = s.sum(2)
    s = torch.cat([s, s.new_full(s.shape[:-1] + (1,), float("-inf"))], -1)   # slot T = "-1"
    picked = s.gather(-1, torch.where(idx < 0, s.size(-1) - 1, idx).long())
    return picked.sort(-1).values


@pytest.mark.parametrize("B,S,H,D,T,K", [(2, 3, 4, 16, 20, 12), (1, 1, 8, 64, 50, 40)])
def test_sparse_attn_sdpa_matches_reference(B, S, H, D, T, K):
    q, kv, idx, sink = _attn_inputs(B, S, H, D, T, K)
    out = cuda.sparse_attn_sdpa(q, kv, idx, sink, D ** -0.5)
    ref = REFERENCE.sparse_attn(q, kv, idx, sink, D ** -0.5)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert B * S == 1 or out[0, 0].abs().max() == 0


@pytest.mark.parametrize("T,topk", [(30, 8), (5, 8)])   # topk > T pads with -1
def test_indexer_topk_bmm_matches_reference(T, topk):
    q, k, w, n_visible = _indexer_inputs(2, 3, 4, 16, T)
    idx = cuda.indexer_topk_bmm(q, k, w, n_visible, topk)
    ref = REFERENCE.indexer_topk(q, k, w, n_visible, topk)
    assert idx.shape == ref.shape == (2, 3, topk) and idx.dtype == torch.int32
    torch.testing.assert_close(_picked_scores(q, k, w, n_visible, idx), _picked_scores(q, k, w, n_visible, ref))
    assert ((idx >= 0).sum(-1) == n_visible.clamp(max=topk)).all()


@pytest.mark.parametrize("use_triton", [False, True])
def test_tables_split_the_selection_into_their_scores_and_top_k(use_triton):
    """Both CUDA tables name their scores kernel and top-k (`Kernels.indexer_scores`, `select_topk`), which a decode
    schedule runs as two stages: composed, they are the table's `indexer_topk` (Triton: under the interpreter)."""
    if use_triton and not cuda.triton_runs_on(TRITON_DEVICE):
        pytest.skip("needs triton with a CUDA device, or TRITON_INTERPRET=1")
    table = cuda.make_kernels(use_triton=use_triton)
    q, k, w, n_visible = _indexer_inputs(2, 3, 4, 16, 70, device=TRITON_DEVICE if use_triton else "cpu")
    split = table.select_topk(table.indexer_scores(q, k, w, n_visible), 8)
    assert table.indexer_scores is not None and torch.equal(split, table.indexer_topk(q, k, w, n_visible, 8))


def test_indexer_topk_bmm_breaks_ties_as_the_reference():
    """Scores tied at the k-th place (here 0, as when every head's ReLU is zero) go to the lowest indices, as the
    `kernels.indexer_topk` contract says: the same ids as the reference, not just the same scores."""
    q, k, w, n_visible = _indexer_inputs(1, 1, 4, 16, 64)
    k[:, 1:] = 0.0                                                 # every key but the first scores exactly 0
    n_visible.fill_(64)
    idx = cuda.indexer_topk_bmm(q, k, w, n_visible, 8)
    ref = REFERENCE.indexer_topk(q, k, w, n_visible, 8)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


def test_make_kernels_replaces_only_its_stages():
    k = cuda.make_kernels(use_triton=False)
    assert k.sparse_attn is cuda.sparse_attn_sdpa and k.indexer_topk is cuda.indexer_topk_bmm
    changed = {f.name for f in dataclasses.fields(k) if getattr(k, f.name) is not getattr(REFERENCE, f.name)}
    assert changed == {"sparse_attn", "indexer_topk", "indexer_scores", "rms_norm", "rope", "hadamard", "f32_linear"}


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_f32_linear_is_the_float32_product_of_the_held_values(x_dtype, w_dtype):
    """Float32 output from bf16 operands without widening the weight (mm with out_dtype on CUDA; the reference
    elsewhere): the products are exact in float32, so only the summation order may differ."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 256, device=device).to(x_dtype)
    w = torch.randn(96, 256, device=device).to(w_dtype)
    out = cuda.f32_linear_bf16(x, w)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 96)
    exact = (x.double() @ w.double().t()).float()
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-4)


@needs_triton_or_interpreter
def test_f32_linear_takes_the_triton_walk_for_one_row_with_few_outputs(monkeypatch):
    """One bf16 row (a batch-1 router or compressor) runs `f32_gemv_triton`; two rows, a float32 operand or more
    outputs than F32_GEMV_MAX_OUT keep `f32_linear_bf16`. Either way: the float32 product of the held values."""
    calls = []
    walk = cuda.f32_gemv_triton
    monkeypatch.setattr(cuda, "f32_gemv_triton", lambda x, w: calls.append(tuple(x.shape)) or walk(x, w))
    w = torch.randn(96, 256, device=TRITON_DEVICE).to(torch.bfloat16)
    for shape, dtype in (((1, 1, 256), torch.bfloat16), ((2, 1, 256), torch.bfloat16), ((1, 256), torch.float32)):
        x = torch.randn(shape, device=TRITON_DEVICE).to(dtype)
        out = cuda.f32_linear_triton(x, w)
        assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out, (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-4)
    assert calls == [(1, 256)]
    monkeypatch.setattr(cuda, "F32_GEMV_MAX_OUT", 64)
    cuda.f32_linear_triton(torch.randn(1, 256, device=TRITON_DEVICE).to(torch.bfloat16), w)
    assert calls == [(1, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_elementwise_stages_match_reference(dtype):
    x3 = (torch.randn(2, 3, 192) * 3).to(dtype)
    x4 = torch.randn(2, 3, 4, 128).to(dtype)
    angles = torch.randn(2, 3, 32) * 10
    cos, sin = angles.cos(), angles.sin()
    w = torch.randn(192)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for weight in (w, None):
        torch.testing.assert_close(cuda.rms_norm_fused(x3, weight, 1e-6), REFERENCE.rms_norm(x3, weight, 1e-6), **tol)
    for x in (x3, x4):
        for inverse in (False, True):
            out = cuda.rope_complex(x, cos, sin, inverse)
            assert out.dtype == x.dtype
            torch.testing.assert_close(out, REFERENCE.rope(x, cos, sin, inverse), **tol)
        if dtype == torch.float32:  # inverse undoes forward (in bf16 the intermediate rounding dominates)
            torch.testing.assert_close(cuda.rope_complex(cuda.rope_complex(x, cos, sin), cos, sin, True), x, **tol)
    torch.testing.assert_close(cuda.hadamard_matmul(x4), REFERENCE.hadamard(x4), **tol)
    with pytest.raises(ValueError, match="power of two"):
        cuda.hadamard_matmul(x3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_rope_equals_the_reference_bit_for_bit(dtype):
    """The compile table's RoPE: the same products and sums as the reference, so equal to the bit, on 3-D and 4-D
    inputs, forward and inverse, with inf / nan in the passed-through dims staying where they are."""
    angles = torch.randn(2, 3, 32) * 10
    cos, sin = angles.cos(), angles.sin()
    x3 = (torch.randn(2, 3, 192) * 3).to(dtype)
    x3[0, 0, :2] = torch.tensor([float("inf"), float("nan")])
    for x in (x3, torch.randn(2, 3, 4, 128).to(dtype)):
        for inverse in (False, True):
            out = cuda.rope_pointwise(x, cos, sin, inverse)
            assert out.dtype == x.dtype
            assert torch.equal(out.nan_to_num(), REFERENCE.rope(x, cos, sin, inverse).nan_to_num())
            assert torch.equal(out.isnan(), x.isnan())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 +-1 matmul form runs on CUDA only")
def test_hadamard_matmul_bf16_is_the_butterfly_to_float32_rounding():
    """bf16 inputs take the +-1 bf16 matmul with float32 accumulation: exact products, so only the float32
    summation order differs from the reference butterfly (then one bf16 rounding of the same float32 value)."""
    for rows in (16, 512):                # 16 rows: the shape where cuBLAS's float32 form was slow
        x = torch.randn(rows, 128, device="cuda").to(torch.bfloat16)
        exact = REFERENCE.hadamard(x.double())
        y = cuda.hadamard_matmul(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), exact, rtol=8e-3, atol=1e-6)     # one bf16 rounding
        assert (y.float() != REFERENCE.hadamard(x.float()).to(torch.bfloat16).float()).float().mean() < 0.01


def _record_launches(monkeypatch, module, *names, launch=True):
    """Replace the Triton kernels `names` of `module` by ones that append each launch, (name, grid, args, kwargs),
    to the returned list and then launch it (`launch=False`: only record it)."""
    launches = []

    class Recorded:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(module, name)

        def __getitem__(self, grid):
            def recorded(*args, **kwargs):
                launches.append((self.name, grid, args, kwargs))
                return self.kernel[grid](*args, **kwargs) if launch else None
            return recorded

    for name in names:
        monkeypatch.setattr(module, name, Recorded(name))
    return launches


def _sorted_ids(idx):
    """Rows sorted ascending with the -1 slots moved to the end."""
    big = torch.iinfo(torch.int32).max
    out = torch.where(idx < 0, big, idx).sort(-1).values
    return torch.where(out == big, -1, out)


@needs_triton_or_interpreter
@pytest.mark.parametrize("T,k,chunk,block,cooperative", [
    (100, 16, None, None, None), (4000, 512, None, None, None), (300, 64, 128, 64, False), (50, 64, None, None, None),
    (50, 64, 32, 32, False), (1000, 512, 256, 128, False), (3000, 7, 512, 128, False), (2000, 100, 1024, 64, False),
    (5000, 512, None, None, False), (5000, 512, None, None, None), (50, 64, 32, 32, True), (600, 100, 192, 64, True)])
def test_triton_topk_keeps_the_reference_selection(T, k, chunk, block, cooperative):
    """One program per row (T <= TOPK_ROW_MAX_ENTRIES by default: two bits of the k-th key per step) and chunked
    radix select (explicit chunks, or a longer row; chunks of more than 2 blocks keep their candidates after the
    second byte), a launch per byte or cooperative (one launch; by default for these 6 rows): the k largest, ties at
    the k-th score to the lowest indices (across chunks too), -inf never, -1 padding after the picks (T < k too, in
    one program and chunked), several blocks per program; rows of ties, of negatives, of -inf halves, of +-0, of
    values that differ only in the low two bytes of their keys."""
    from ascend.backends import triton_sparse_attn
    g = torch.Generator().manual_seed(T)
    s = torch.randn(6, T, generator=g)
    s[0] = torch.randint(0, 3, (T,), generator=g).float()
    s[1, T // 2:] = float("-inf")
    s[2] = -s[2].abs()
    s[3, :5], s[3, 5:10], s[3, 10:] = -0.0, 0.0, -1.0
    s[4] = torch.randint(-2, 2, (T,), generator=g).float() * 1e-3
    s[5] = 1 + torch.randperm(T, generator=g).float() * 2 ** -20     # distinct in the two low bytes only
    got = triton_sparse_attn.topk(s.to(TRITON_DEVICE), k, chunk=chunk, block=block, cooperative=cooperative).cpu()
    assert got.shape == (6, k) and got.dtype == torch.int32
    ordered = (got[:, 1:] > got[:, :-1]) | (got[:, 1:] < 0)                 # index order, -1 after the picks
    assert ordered.all() and not ((got[:, :-1] < 0) & (got[:, 1:] >= 0)).any()
    assert torch.equal(_sorted_ids(got), _sorted_ids(select_topk(s, k)))


@needs_triton_or_interpreter
@pytest.mark.parametrize("cooperative", [False, True])
def test_triton_topk_decided_in_the_candidates_of_compacted_chunks(monkeypatch, cooperative):
    """Rows whose keys share their top two bytes: every entry is a candidate of its chunk and the k-th key's low
    bytes come from the passes that read only the candidates (distinct values, and ties at the k-th score); the 6
    chunks' histograms read 2 at a time."""
    from ascend.backends import triton_sparse_attn
    monkeypatch.setitem(triton_sparse_attn.TOPK_CHUNKED, "p_block", 2)
    g = torch.Generator().manual_seed(1)
    s = torch.stack((1 + torch.randperm(1536, generator=g).float() * 2 ** -20,
                     1 + torch.randint(0, 50, (1536,), generator=g).float() * 2 ** -20))
    got = triton_sparse_attn.topk(s.to(TRITON_DEVICE), 768, chunk=256, block=64, cooperative=cooperative).cpu()
    assert torch.equal(_sorted_ids(got), _sorted_ids(select_topk(s, 768)))


@needs_triton_or_interpreter
@pytest.mark.parametrize("cooperative", [False, True])
def test_triton_topk_sums_the_chunk_slots_block_by_block(monkeypatch, cooperative):
    """The row's last program (cooperative: each program) reads the chunks' histograms p_block slots at a time,
    carrying the counts of keys above the k-th and of ties from block to block: rows of many ties over 8 chunks,
    read 2 at a time."""
    from ascend.backends import triton_sparse_attn
    monkeypatch.setitem(triton_sparse_attn.TOPK_CHUNKED, "p_block", 2)
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (3, 512), generator=g).float()
    s[1, ::3] = float("-inf")
    got = triton_sparse_attn.topk(s.to(TRITON_DEVICE), 150, chunk=64, block=64, cooperative=cooperative).cpu()
    assert torch.equal(_sorted_ids(got), _sorted_ids(select_topk(s, 150)))


@needs_triton_or_interpreter
def test_triton_topk_one_program_per_row_for_short_rows(monkeypatch):
    """Rows up to TOPK_ROW_MAX_ENTRIES take the one-program kernel (the row in registers), longer ones the chunked
    radix select: where TOPK_COOPERATIVE["per_sm"] programs per SM make chunks of at most its max_steps steps, the
    cooperative launch (the interpreter: one launch per barrier, STOP 0-4); longer chunks, or more rows than that
    (a prefill chunk's), a launch per byte over about TOPK_CHUNKED["per_sm"] programs per SM, one chunk per row
    once the rows give that many, without candidates (no buffer as large as the scores). A nominal 8 SMs."""
    from ascend.backends import triton_sparse_attn
    from ascend.backends.triton_common import INTERPRETING
    monkeypatch.setattr(triton_sparse_attn, "sm_count", lambda device: 8)
    monkeypatch.setattr(triton_sparse_attn, "TOPK_ROW_MAX_ENTRIES", 64)
    monkeypatch.setitem(triton_sparse_attn.TOPK_CHUNKED, "block", 16)        # chunks are whole steps
    monkeypatch.setitem(triton_sparse_attn.TOPK_CHUNKED, "per_sm", 4)
    monkeypatch.setitem(triton_sparse_attn.TOPK_COOPERATIVE, "per_sm", 2)
    monkeypatch.setitem(triton_sparse_attn.TOPK_COOPERATIVE, "max_steps", 2)
    launches = _record_launches(monkeypatch, triton_sparse_attn, "_topk_row_kernel", "_radix_pass_kernel",
                                "_radix_write_kernel", "_radix_coop_kernel")
    chunked = lambda chunks: [("_radix_pass_kernel", chunks, None)] * 4 + [("_radix_write_kernel", chunks, None)]  # noqa: E731
    coop = lambda chunks: [("_radix_coop_kernel", chunks, stop) for stop in ((0, 1, 2, 3, 4) if INTERPRETING else (4,))]  # noqa: E731
    # 16 programs resident: 2 rows of 65 in 8 chunks of 9 -> one step of 16 each, 5 chunks; of 560: 70 -> 80 > 2
    # steps, so a launch per byte over 32 programs, 16 per row of 35 -> 48 entries (3 steps, candidates kept), 12
    for rows, T, want, kept in ((2, 64, [("_topk_row_kernel", 2, None)], None),
                                (32, 64, [("_topk_row_kernel", 32, None)], None),
                                (2, 65, coop(5), None), (2, 560, chunked(12), 2 * 12 * 48), (32, 65, chunked(1), 0)):
        launches.clear()
        s = torch.randn(rows, T, generator=torch.Generator().manual_seed(T))
        got = triton_sparse_attn.topk(s.to(TRITON_DEVICE), 16).cpu()
        assert [(name, grid[-1], kwargs.get("STOP")) for name, grid, _, kwargs in launches] == want, (rows, T)
        if kept is not None:            # the candidate buffer each launch per byte was handed
            assert [args[7].numel() for name, _, args, _ in launches if name == "_radix_pass_kernel"] == [kept] * 4
        assert torch.equal(_sorted_ids(got), _sorted_ids(select_topk(s, 16)))


@needs_triton_or_interpreter
def test_triton_topk_cooperative_launch_fits_on_the_gpu_at_once(monkeypatch):
    """The cooperative top-k's programs wait for each other, so all of them must be resident at once (on a GPU; the
    interpreter's barriers end launches, so it has no such limit): more than TOPK_COOPERATIVE["per_sm"] per SM
    asked for is refused before anything is launched, more rows than that too; an explicit chunk that would make
    too many programs takes the launch per byte by default. A nominal 8 SMs: 16 programs."""
    from ascend.backends import triton_sparse_attn
    monkeypatch.setattr(triton_sparse_attn, "INTERPRETING", False)
    monkeypatch.setattr(triton_sparse_attn, "sm_count", lambda device: 8)
    monkeypatch.setitem(triton_sparse_attn.TOPK_COOPERATIVE, "per_sm", 2)
    launches = _record_launches(monkeypatch, triton_sparse_attn, "_radix_coop_kernel", launch=False)
    s = torch.randn(16, 64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="16 rows of 2 chunks are more programs than the 16"):
        triton_sparse_attn.topk(s, 8, chunk=32, block=32, cooperative=True)
    with pytest.raises(ValueError, match="17 rows of 2 chunks are more programs than the 16"):
        triton_sparse_attn.topk(torch.randn(17, 5000, device=TRITON_DEVICE), 8, cooperative=True)
    s = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    got = triton_sparse_attn.topk(s.to(TRITON_DEVICE), 8, chunk=32, block=16).cpu()     # 4 x 8 chunks: per byte
    assert torch.equal(_sorted_ids(got), _sorted_ids(select_topk(s, 8)))
    assert not launches                 # the cooperative kernel never launched


@needs_triton
def test_triton_topk_cooperative_repeats_and_replays_in_a_graph():
    """On the GPU the cooperative top-k's barriers are real: decode-sized rows (8 x 32,768: 16 chunks per row, 32 x
    32,768: 8) pick what the launch per byte picks, call after call on other scores (the last program of each row
    zeroes the counts for the next) and replayed from a captured graph on new scores."""
    from ascend.backends import triton_common, triton_sparse_attn
    for rows in (8, 32):
        for seed in range(3):                   # other scores each call: stale histograms or counts would show
            s = torch.randn(rows, 32768, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            s[0] = torch.randint(0, 3 + seed, (32768,), device="cuda").float()     # ties across chunks
            s[1, 16384:] = float("-inf")
            got = triton_sparse_attn.topk(s, 512, cooperative=True)
            assert torch.equal(got, triton_sparse_attn.topk(s, 512, cooperative=False))
            assert not triton_common._TICKETS[(s.device, "barriers", None)][0].any()   # zero again for the next call
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        triton_sparse_attn.topk(s, 512, cooperative=True)                      # compiled outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = triton_sparse_attn.topk(s, 512, cooperative=True)
    for seed in range(3):
        s.copy_(torch.randn(s.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, triton_sparse_attn.topk(s, 512, cooperative=False))


@needs_triton_or_interpreter
def test_triton_topk_rows_all_invisible():
    from ascend.backends import triton_sparse_attn
    s = torch.full((2, 1, 40), float("-inf"), device=TRITON_DEVICE)
    assert (triton_sparse_attn.topk(s, 8) == -1).all()
    assert (triton_sparse_attn.topk(s, 8, chunk=16, block=16) == -1).all()


def test_make_kernels_for_compile_uses_traceable_forms():
    k = cuda.make_kernels(use_triton=False, for_compile=True)
    assert k.rms_norm is REFERENCE.rms_norm and k.rope is cuda.rope_pointwise and k.hadamard is cuda.hadamard_matmul
    assert k.f32_linear is cuda.f32_linear_bf16 and k.fp4_round_trip is quant.fp4_round_trip_float
    assert k.sparse_attn is cuda.sparse_attn_sdpa and k.indexer_topk is cuda.indexer_topk_bmm


def _prefill(layer, config, layer_id, device="cpu", dtype=torch.float32, batch=3):
    """(20 tokens' inputs, the cache after the first 18 through the layer eagerly)."""
    from model.cache import LayerCache

    torch.manual_seed(1)
    cache = LayerCache(config, layer_id, batch, 64, dtype, device=device)
    x = torch.randn(batch, 20, config.dim, device=device, dtype=dtype)
    layer(x[:, :18], torch.zeros(batch, dtype=torch.long, device=device), cache)
    return x, cache


def _decode_twice(layer, config, layer_id, step, device="cpu", dtype=torch.float32, batch=3, prefilled=None):
    """Prefill 18 tokens eagerly (or start from a copy of `prefilled`, `_prefill`'s), then two decode steps
    through `step` (crossing a CSA block boundary)."""
    x, cache = copy.deepcopy(prefilled) if prefilled else _prefill(layer, config, layer_id, device, dtype, batch)
    ys = [step(x[:, p:p + 1].contiguous(), torch.full((batch,), p, device=device), cache) for p in (18, 19)]
    return torch.cat(ys, 1), cache


@pytest.mark.parametrize("triton", [False, pytest.param(True, marks=needs_triton_or_interpreter)])
@pytest.mark.parametrize("layer_id", [1, 2])    # tiny: CSA, HCA
def test_compiled_decode_traces_as_one_graph_and_matches_eager(layer_id, triton):
    """fullgraph compile of a whole decode layer (aot_eager: the functionalised graph, run without code generation,
    so the test stays fast on CPU) equals the eager layer, cache writes included (with the Triton stages: the
    compressor's custom op, which writes its state in place, too); the GPU test below runs inductor."""
    from ascend.onnx_export import synthetic_attention
    from model.kernels import use_kernels
    from model.config import ModelConfig

    config = ModelConfig.preset("tiny")
    device = TRITON_DEVICE if triton else "cpu"
    layer = use_kernels(synthetic_attention(config, layer_id, device), cuda.make_kernels(use_triton=triton,
                                                                                      for_compile=True))
    torch._dynamo.reset()
    with torch.no_grad():
        prefilled = _prefill(layer, config, layer_id, device)      # once: the interpreted kernels' slowest part
        y_eager, c_eager = _decode_twice(layer, config, layer_id, layer, device, prefilled=prefilled)
        y_comp, c_comp = _decode_twice(layer, config, layer_id, cuda.compile_decode(layer, backend="aot_eager"),
                                       device, prefilled=prefilled)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for name in ("kv", "index_kv"):
        if getattr(c_eager, name) is not None:
            torch.testing.assert_close(getattr(c_comp, name), getattr(c_eager, name), rtol=1e-5, atol=1e-5)
    for name in ("compressor", "index_compressor"):
        if getattr(c_eager, name) is not None:
            for part in ("kv", "score"):
                torch.testing.assert_close(getattr(getattr(c_comp, name), part),
                                           getattr(getattr(c_eager, name), part), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pdl", [True, False])
def test_compile_decode_follows_the_backends_pdl_switch(monkeypatch, pdl):
    """`triton_common.PDL` switches inductor's programmatic dependent launch with the backend's own kernels'."""
    pytest.importorskip("triton")
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no enable_pdl")
    from ascend.backends import triton_common
    monkeypatch.setattr(triton_common, "PDL", pdl)
    seen = {}

    def backend(gm, example_inputs):        # compiles inside the first call, as inductor would: reads its config
        seen.update(pdl=torch._inductor.config.triton.enable_pdl, combo=torch._inductor.config.combo_kernels)
        return gm.forward

    torch._dynamo.reset()
    step = cuda.compile_decode(lambda x: x * 2, backend=backend)
    assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))
    assert seen == {"pdl": pdl, "combo": True}


def test_compiled_step_keeps_the_eager_roundings_before_fp4():
    """inductor (on CPU here) with `eager_numerics`: the indexer queries (RoPE, Hadamard, FP4 simulation, bf16) equal
    the eager ones bit for bit. Without it fused float32 intermediates move FP4 codes (3% here; on the H200 the
    indexer then picked other entries and a V4-Flash CSA layer's output moved by 13-26%)."""
    from ascend.onnx_export import synthetic_attention
    from model.kernels import use_kernels
    from model.config import ModelConfig

    config = ModelConfig.preset("tiny", dtype="bf16")
    layer = use_kernels(synthetic_attention(config, 1), cuda.make_kernels(use_triton=False, for_compile=True))
    torch.manual_seed(0)
    qr = torch.randn(4, 1, config.q_lora_rank, dtype=torch.bfloat16) * 3
    cos, sin = layer.rotary(torch.tensor([[5], [70], [1000], [12345]]))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer.indexer.queries(qr, cos, sin)
        compiled = cuda.compile_decode(layer.indexer.queries)(qr, cos, sin)
    assert torch.equal(compiled, eager)


def _fp4_experts(n_experts, d_out, d_in, n, device="cpu", dtype=torch.float32, seed=0):
    """Random packed e2m1 bytes (every code, -0 included) with ue8m0 scales 2^-6 .. 2^1, rows and expert ids."""
    g = torch.Generator(device).manual_seed(seed)   # drawn on the device: ~1 GiB at V4-Flash shapes
    weight = torch.randint(-128, 128, (n_experts, d_out, d_in // 2), generator=g, dtype=torch.int8, device=device)
    scale = torch.randint(121, 129, (n_experts, d_out, d_in // 32), generator=g, dtype=torch.uint8, device=device)
    x = torch.randn(n, d_in, generator=g, device=device).to(dtype)
    idx = torch.randint(0, n_experts, (n,), generator=g, device=device)
    return x, weight, scale.view(torch.float8_e8m0fnu), idx


@pytest.mark.parametrize("fmt", ["fp8", "int8", "bf16"])
def test_expert_matmul_keeps_the_reference_for_other_formats(fmt):       # what the kernels are not given
    from model import quant
    stored = [quant.quantize_weight(torch.randn(16, 256), fmt) for _ in range(3)]
    weight, scale = torch.stack([w for w, _ in stored]), None if stored[0][1] is None else torch.stack(
        [s for _, s in stored])
    x, idx = torch.randn(5, 256), torch.tensor([2, 0, 0, 1, 2])
    assert torch.equal(cuda.expert_matmul_triton(x, weight, scale, fmt, idx, formats=("fp4",)),
                       REFERENCE.expert_matmul(x, weight, scale, fmt, idx))


@needs_triton_or_interpreter
@pytest.mark.parametrize("d_out,d_in,launch", [(40, 96, dict(block_out=16, block_in=64)),       # ragged out and in
                                               (64, 128, dict(block_out=32, block_in=128, sort=False)),
                                               (24, 64, dict(block_out=32, block_in=64))])
def test_triton_expert_matmul_fp4_matches_reference(d_out, d_in, launch):
    """The in-register e2m1 / ue8m0 decoding against model.quant's dequantisation (float32 rows: exact products,
    so only the summation order differs)."""
    from ascend.backends import triton_moe
    x, weight, scale, idx = _fp4_experts(3, d_out, d_in, 5, TRITON_DEVICE)
    y = triton_moe.expert_matmul_fp4(x, weight, scale, idx, **launch)
    torch.testing.assert_close(y, REFERENCE.expert_matmul(x, weight, scale, "fp4", idx), rtol=1e-5, atol=1e-4)


def _fp8_experts(n_experts, d_out, d_in, n, device="cpu", dtype=torch.float32, seed=0):
    """Random e4m3 weights with ue8m0 scales 2^-3 .. 2^0 per 128 x 128 block (ragged edges allowed)."""
    g = torch.Generator(device).manual_seed(seed)
    weight = (torch.randn(n_experts, d_out, d_in, generator=g, device=device) * 8).to(torch.float8_e4m3fn)
    scale = torch.randint(124, 128, (n_experts, -(-d_out // 128), -(-d_in // 128)), generator=g, dtype=torch.uint8,
                          device=device)
    x = torch.randn(n, d_in, generator=g, device=device).to(dtype)
    idx = torch.randint(0, n_experts, (n,), generator=g, device=device)
    return x, weight, scale.view(torch.float8_e8m0fnu), idx


@needs_triton_or_interpreter
@pytest.mark.parametrize("launch", [dict(block_out=16, block_in=32), dict(block_out=64, block_in=128, sort=False)])
def test_triton_expert_matmul_fp8_matches_reference(launch):
    from ascend.backends import triton_moe
    x, weight, scale, idx = _fp8_experts(3, 136, 160, 5, TRITON_DEVICE)           # ragged 128-blocks both ways
    y = triton_moe.expert_matmul_fp8(x, weight, scale, idx, **launch)
    torch.testing.assert_close(y, REFERENCE.expert_matmul(x, weight, scale, "fp8", idx), rtol=1e-5, atol=1e-3)


@needs_triton_or_interpreter
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_fused_linear_matches_reference_and_falls_back_for_prefill(fmt, monkeypatch):
    """`kernels.linear` on decode-sized inputs ([B, S, in] with B * S <= LINEAR_FUSED_MAX_ROWS) runs the stored-format
    kernel and equals dequantise-then-matmul; a larger input takes the reference (checked by making the kernel
    unreachable)."""
    make = _fp4_experts if fmt == "fp4" else _fp8_experts
    _, weight, scale, _ = make(1, 136, 256, 1, TRITON_DEVICE)
    weight, scale = weight[0], scale[0]
    x = torch.randn(2, 3, 256, device=TRITON_DEVICE)
    y = cuda.linear_triton(x, weight, scale, fmt)
    assert y.shape == (2, 3, 136)
    torch.testing.assert_close(y, REFERENCE.linear(x, weight, scale, fmt), rtol=1e-5, atol=1e-3)
    monkeypatch.setattr(cuda, "expert_matmul_quant_triton", None)        # any call to the kernel now fails
    big = torch.randn(cuda.LINEAR_FUSED_MAX_ROWS + 1, 256, device=TRITON_DEVICE)
    torch.testing.assert_close(cuda.linear_triton(big, weight, scale, fmt), REFERENCE.linear(big, weight, scale, fmt))


@needs_triton_or_interpreter
def test_bf16_linear_of_one_row_takes_the_walk(monkeypatch, interpreter_bf16):
    """A bf16 projection of one row with few outputs (the indexer's weights_proj at batch-1 decode) runs the float32
    walk and rounds once to bf16: within one bf16 rounding of the exact product; two rows take the bf16 projection
    kernel (`triton_linear`), the same within one rounding."""
    calls = []
    walk, plain = cuda.f32_gemv_triton, cuda.plain_matmul_triton
    monkeypatch.setattr(cuda, "f32_gemv_triton", lambda x, w: calls.append(("walk", x.shape[0])) or walk(x, w))
    monkeypatch.setattr(cuda, "plain_matmul_triton", lambda x, w: calls.append(("plain", x.shape[0])) or plain(x, w))
    w = torch.randn(64, 256, device=TRITON_DEVICE).to(torch.bfloat16)
    for rows in (1, 2):
        x = torch.randn(rows, 1, 256, device=TRITON_DEVICE).to(torch.bfloat16)
        y = cuda.linear_triton(x, w, None, "bf16")
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 1, 64)
        torch.testing.assert_close(y.float(), (x.double() @ w.double().t()).float(), rtol=2 ** -7, atol=1e-3)
    assert calls == [("walk", 1), ("plain", 2)]


@needs_triton_or_interpreter
def test_triton_table_covers_the_decode_stages():
    from ascend.backends import triton_argmax, triton_mhc

    k = cuda.make_kernels(use_triton=True)
    assert k.argmax is triton_argmax.argmax
    assert (k.hc_pre, k.hc_post, k.hc_head) == (triton_mhc.hc_pre, triton_mhc.hc_post, triton_mhc.hc_head)
    assert k.sparse_attn is cuda.sparse_attn_triton and k.grouped_linear.func is cuda.grouped_linear_triton
    assert k.gate_topk is cuda.gate_topk_triton and k.compress_blocks is cuda.compress_blocks_triton
    assert k.linear.func is cuda.linear_triton and k.expert_matmul.func is cuda.expert_matmul_triton
    # the formats the Triton expert kernels read in place: the MoE runs them static at any size (prefill too)
    assert k.grouped_expert_formats == k.expert_matmul.keywords["formats"] == cuda.triton_expert_formats()
    # the bf16 projection kernel, decided once for the table as the formats are
    assert k.linear.keywords["plain"] == k.grouped_linear.keywords["plain"] == cuda.plain_matmul_supported()


def test_bf16_projection_kernel_needs_sm80_on_nvidia(monkeypatch):
    """`plain_matmul_supported`: bf16 tensor-core dots from sm_80 on, not on ROCm; the CPU (interpreter) always;
    a table without it sends bf16 projections to the reference."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for cap, want in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert cuda.plain_matmul_supported() is want
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not cuda.plain_matmul_supported()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda.plain_matmul_supported()
    monkeypatch.setattr(cuda, "plain_matmul_triton", None)            # any call to the kernel now fails
    x, w = torch.randn(2, 1, 64).to(torch.bfloat16), torch.randn(2 * 16, 64).to(torch.bfloat16)
    torch.testing.assert_close(cuda.linear_triton(x, w, None, "bf16", plain=False),
                               REFERENCE.linear(x, w, None, "bf16"))
    groups = x.view(2, 1, 1, 64).expand(2, 1, 2, 64)
    torch.testing.assert_close(cuda.grouped_linear_triton(groups, w, None, "bf16", plain=False),
                               REFERENCE.grouped_linear(groups, w, None, "bf16"))


@needs_triton_or_interpreter
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_grouped_linear_matches_reference_and_falls_back_for_prefill(fmt, monkeypatch):
    """`kernels.grouped_linear` (wo_a: 4 groups of a [4 * 128, 256] stored weight) on decode-sized inputs runs the
    expert kernels with one expert per group and equals dequantise-then-einsum; a prefill-sized input takes the
    reference."""
    from model import quant

    groups, out, d_in = 4, 128, 256
    weight, scale = quant.quantize_weight(torch.randn(groups * out, d_in, device=TRITON_DEVICE) / 16, fmt)
    x = torch.randn(2, 3, groups, d_in, device=TRITON_DEVICE)
    y = cuda.grouped_linear_triton(x, weight, scale, fmt)
    assert y.shape == (2, 3, groups, out)
    torch.testing.assert_close(y, REFERENCE.grouped_linear(x, weight, scale, fmt), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(cuda, "expert_matmul_quant_triton", None)        # any call to the kernel now fails
    big = torch.randn(cuda.LINEAR_FUSED_MAX_ROWS + 1, 1, groups, d_in, device=TRITON_DEVICE)
    torch.testing.assert_close(cuda.grouped_linear_triton(big, weight, scale, fmt),
                               REFERENCE.grouped_linear(big, weight, scale, fmt))


# ------------------------------------------------------------------------------------------------ GPU only

@needs_triton
@pytest.mark.parametrize("B,S,H,D,T,K", [(1, 1, 64, 512, 4096, 640), (3, 2, 4, 64, 300, 200),
                                         (32, 1, 64, 512, 2048, 640), (1, 1, 16, 128, 70000, 8320)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_sparse_attn_matches_reference(B, S, H, D, T, K, dtype):
    q, kv, idx, sink = _attn_inputs(B, S, H, D, T, K, device="cuda", dtype=dtype)
    out = torch.full_like(q, float("nan"))
    out.copy_(cuda.sparse_attn_triton(q, kv, idx, sink, D ** -0.5))
    ref = REFERENCE.sparse_attn(q.double(), kv.double(), idx, sink.double(), D ** -0.5)
    err = (out.double() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
    assert B * S == 1 or out[0, 0].abs().max() == 0


def _hopper() -> bool:
    """An sm_90 GPU with Triton: where the Gluon sparse attention runs."""
    if not cuda.triton_available():
        return False
    from ascend.backends.triton_common import capability
    return capability(torch.device("cuda")) == (9, 0)


SPARSE_VARIANTS = [dict(block_h=32, block_k=32, num_warps=8, waves=2.0), dict(block_h=16, block_k=32, num_warps=4),
                   dict(block_h=64, block_k=32, num_warps=8), dict(block_h=32, block_k=64, num_warps=8),
                   dict(block_h=32, block_k=32, num_warps=8, waves=4.0), dict(block_h=32, block_k=32, num_warps=4),
                   cuda.SPARSE_ATTN_BATCH_CONFIG, cuda.SPARSE_ATTN_LONG_CONFIG] + (
                   [cuda.SPARSE_ATTN_WGMMA_CONFIG] if _hopper() else [])


@needs_triton
@pytest.mark.parametrize("variant", SPARSE_VARIANTS)
@pytest.mark.parametrize("B,K", [(1, 8320), (32, 640)])
def test_triton_sparse_attn_launch_variants(B, K, variant):
    """Every launch setting the benchmark times computes the same function (bf16, V4 head shapes)."""
    from ascend.backends import triton_sparse_attn
    q, kv, idx, sink = _attn_inputs(B, 1, 64, 512, 9000, K, device="cuda", dtype=torch.bfloat16)
    out = triton_sparse_attn.sparse_attn(q, kv, idx, sink, 512 ** -0.5, **variant)
    ref = REFERENCE.sparse_attn(q.double(), kv.double(), idx, sink.double(), 512 ** -0.5)
    assert torch.isfinite(out).all() and (out.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.skipif(not _hopper(), reason="the Gluon wgmma kernel needs an sm_90 GPU")
@pytest.mark.parametrize("B,S,D,T,K,block_k,waves,dtype", [
    (2, 1, 512, 300, 200, 64, 1.0, torch.bfloat16),     # K past a tile, chunks of one tile
    (3, 2, 256, 700, 1000, 64, 0.2, torch.float16),     # S = 2, 256 dims, chunks of 4 tiles
    (4, 1, 512, 5000, 777, 64, 0.01, torch.bfloat16),   # one chunk (normalised in the kernel, no merge)
    (2, 1, 256, 900, 1500, 32, 0.1, torch.bfloat16),    # 32 keys per step, chunks of several tiles
    (8, 1, 512, 8400, 8320, 64, 1.0, torch.bfloat16)])  # HCA at 1M context, batch 8
def test_wgmma_sparse_attn_matches_triton_kernel_and_reference(monkeypatch, B, S, D, T, K, block_k, waves, dtype):
    """`gluon_sparse_attn`'s kernel (wgmma=True; it, not the Triton kernel, launched) against the Triton kernel at the
    same tiles and chunks, and the reference: empty slots anywhere, rows past the cache (masked like -1), a query
    with none, a list ending inside a tile; and inside a captured graph."""
    from ascend.backends import gluon_sparse_attn, triton_sparse_attn
    q, kv, idx, sink = _attn_inputs(B, S, 64, D, T, K, device="cuda", dtype=dtype)
    idx[torch.rand(idx.shape, device="cuda") < 0.05] = T + 7                # out of range: no row
    setting = dict(block_h=64, block_k=block_k, num_warps=8, waves=waves)
    launches = _record_launches(monkeypatch, gluon_sparse_attn, "_sparse_attn_wgmma_kernel")
    got = triton_sparse_attn.sparse_attn(q, kv, idx, sink, D ** -0.5, **setting, wgmma=True)
    assert len(launches) == 1
    triton_out = triton_sparse_attn.sparse_attn(q, kv, idx, sink, D ** -0.5, **setting)
    ref = REFERENCE.sparse_attn(q.double(), kv.double(), torch.where(idx < T, idx, -1), sink.double(), D ** -0.5)
    assert torch.isfinite(got).all() and (got.double() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(got.float(), triton_out.float(), rtol=2e-2, atol=2e-3)
    assert B * S == 1 or got[0, 0].abs().max() == 0
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = triton_sparse_attn.sparse_attn(q, kv, idx, sink, D ** -0.5, **setting, wgmma=True)
    graph.replay()
    torch.testing.assert_close(out, got, rtol=0, atol=0)


def test_wgmma_kernel_support_rule():
    """`gluon_sparse_attn.supports`, the one rule for the backend's choice and the launcher's refusal: sm_90 (not
    sm_100, not CPU or ROCm's (0, 0)), 2-byte elements, 64 heads per program, 8 warps, 256 or 512 dims and 32 or 64
    keys per step (the shapes run on the H200), tiles within the shared memory (205,312 bytes at 512 dims and 64 keys, as the sm_90 compile reports)."""
    pytest.importorskip("triton")
    from ascend.backends import gluon_sparse_attn as G
    h200 = 227 << 10
    assert G.shared_bytes(512, 64) == 205312 and G.shared_bytes(512, 128) > h200
    assert G.supports((9, 0), 2, 512, 64, 64, 8, h200) and G.supports((9, 0), 2, 256, 64, 32, None, h200)
    for capability, item_bytes, dim, block_h, block_k, num_warps, shared in (
            ((10, 0), 2, 512, 64, 64, 8, h200), ((0, 0), 2, 512, 64, 64, 8, h200), ((9, 0), 4, 512, 64, 64, 8, h200),
            ((9, 0), 2, 64, 64, 64, 8, h200), ((9, 0), 2, 576, 64, 64, 8, h200), ((9, 0), 2, 512, 16, 64, 8, h200),
            ((9, 0), 2, 512, 64, 48, 8, h200), ((9, 0), 2, 512, 64, 128, 8, h200), ((9, 0), 2, 512, 64, 16, 8, h200),
            ((9, 0), 2, 512, 64, 64, 4, h200), ((9, 0), 2, 512, 64, 64, 8, 200 << 10)):
        assert not G.supports(capability, item_bytes, dim, block_h, block_k, num_warps, shared)


def test_wgmma_sparse_attn_refuses_what_it_cannot_run():
    """Off an sm_90 GPU (here: CPU tensors) wgmma=True is a ValueError that names what it needs, not a Gluon compile
    error or a wrong result."""
    pytest.importorskip("triton")
    from ascend.backends import triton_sparse_attn
    q, kv, idx, sink = _attn_inputs(1, 1, 64, 64, 50, 16)
    with pytest.raises(ValueError, match="sm_90 GPU, bf16 / fp16, block_h 64"):
        triton_sparse_attn.sparse_attn(q.bfloat16(), kv.bfloat16(), idx, sink, 0.125, block_h=64, num_warps=8,
                                       wgmma=True)


@needs_triton_or_interpreter
def test_triton_indexer_scores_by_parts_of_several_tiles(monkeypatch):
    """Programs of several tiles each (parts within per_sm programs per SM): 2 queries x 300 keys in tiles of 32 on a
    nominal 8 SMs at 1 per SM, 4 parts per query of 3, 3, 3 and 1 tiles, the last tile partial, keys past each
    query's visible count -inf: the scores of a program per tile, bit for bit. A program per tile takes
    `tile_block_t` keys where given (prefill's), parts `block_t`; keys so few that a part would be one tile (100:
    4 tiles of 32 over 4 parts) take a program per tile too."""
    from ascend.backends import triton_sparse_attn
    monkeypatch.setattr(triton_sparse_attn, "sm_count", lambda device: 8)
    launches = _record_launches(monkeypatch, triton_sparse_attn, "_indexer_scores_kernel")
    q, k, w, n_visible = _indexer_inputs(2, 1, 8, 32, 300, device=TRITON_DEVICE)
    got = triton_sparse_attn.indexer_scores(q, k, w, n_visible, block_t=32, per_sm=1, num_stages=3, tile_block_t=64)
    torch.testing.assert_close(got, triton_sparse_attn.indexer_scores(q, k, w, n_visible, block_t=32), rtol=0, atol=0)
    torch.testing.assert_close(got, triton_sparse_attn.indexer_scores(q, k, w, n_visible, tile_block_t=64), rtol=0,
                               atol=0)
    assert [grid for _, grid, _, _ in launches] == [(2, 4), (2, 10), (2, 5)]
    few = triton_sparse_attn.indexer_scores(q, k[:, :100], w, n_visible, block_t=32, per_sm=1, tile_block_t=64)
    torch.testing.assert_close(few, got[..., :100], rtol=0, atol=0)
    assert launches[-1][1] == (2, 2)
    torch.testing.assert_close(got, cuda.indexer_scores_bmm(q, k, w, n_visible), rtol=1e-5, atol=1e-4)
    assert (got.isinf() == (torch.arange(300, device=TRITON_DEVICE) >= n_visible[..., None])).all()
    assert triton_sparse_attn.indexer_scores(q[:0], k[:0], w[:0], n_visible[:0], per_sm=1).shape == (0, 1, 300)


@needs_triton_or_interpreter
@pytest.mark.parametrize("S,block_t", [(1, 64), (9, 128)])
def test_triton_indexer_scores_with_the_backend_setting(monkeypatch, S, block_t):
    """`cuda.INDEXER_CONFIG` on a nominal 8 SMs: one query per sequence in parts of 64-key tiles (decode), nine
    in a program per 128-key tile (more queries than programs: prefill's form); 6 heads of 24 dims, neither a power
    of two (padded in the kernel): the batched-matmul scores."""
    from ascend.backends import triton_sparse_attn
    monkeypatch.setattr(triton_sparse_attn, "sm_count", lambda device: 8)
    launches = _record_launches(monkeypatch, triton_sparse_attn, "_indexer_scores_kernel")
    q, k, w, n_visible = _indexer_inputs(2, S, 6, 24, 700, device=TRITON_DEVICE)
    got = triton_sparse_attn.indexer_scores(q, k, w, n_visible, **cuda.INDEXER_CONFIG)
    torch.testing.assert_close(got, cuda.indexer_scores_bmm(q, k, w, n_visible), rtol=1e-5, atol=1e-4)
    assert launches[-1][3]["BLOCK_T"] == block_t


@needs_triton
@pytest.mark.parametrize("variant", [dict(block_t=64, num_warps=4), dict(block_t=128, num_warps=8),
                                     dict(block_t=32, num_warps=4), dict(block_t=128, num_warps=4),
                                     dict(block_t=128, num_warps=4, per_sm=4, num_stages=3)])
def test_triton_indexer_launch_variants(variant):
    from ascend.backends import triton_sparse_attn
    q, k, w, n_visible = _indexer_inputs(4, 1, 64, 128, 5000, device="cuda", dtype=torch.bfloat16)
    got = triton_sparse_attn.indexer_scores(q, k, w, n_visible, **variant)
    torch.testing.assert_close(got, cuda.indexer_scores_bmm(q, k, w, n_visible), rtol=1e-2, atol=5e-2)


@needs_triton_or_interpreter
def test_triton_selection_without_keys_selects_nothing():
    """A cache shorter than one compressed block hands the indexer no keys: every slot -1, no launch to fail."""
    q, k, w, _ = _indexer_inputs(2, 3, 4, 16, 0, device=TRITON_DEVICE)
    got = cuda.indexer_topk_triton(q, k, w, torch.zeros(2, 3, dtype=torch.int64, device=TRITON_DEVICE), 5)
    assert torch.equal(got.cpu(), torch.full((2, 3, 5), -1, dtype=torch.int32))


@needs_triton_or_interpreter
def test_triton_indexer_scores_read_strided_keys_in_place():
    """The cache hands the scores its keys as a view without the discard row (rows strided by one more entry): the
    kernel reads them through their strides, as it would a contiguous copy, without making one."""
    from ascend.backends import triton_sparse_attn
    q, k, w, n_visible = _indexer_inputs(2, 1, 8, 32, 65, device=TRITON_DEVICE)
    view = k[:, :64]
    assert not view.is_contiguous()
    copies = []
    original = torch.Tensor.contiguous

    def counted(t, *args, **kwargs):
        copies.append(t is view)
        return original(t, *args, **kwargs)

    n_visible = n_visible.clamp(max=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "contiguous", counted)
        got = triton_sparse_attn.indexer_scores(q, view, w, n_visible)
    assert not any(copies)
    torch.testing.assert_close(got, cuda.indexer_scores_bmm(q, view.contiguous(), w, n_visible), rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("B,S,H,D,T,topk", [(1, 1, 64, 128, 4096, 512), (4, 3, 8, 32, 300, 64), (2, 1, 64, 128, 100, 512)])
def test_triton_indexer_topk_matches_reference(B, S, H, D, T, topk):
    q, k, w, n_visible = _indexer_inputs(B, S, H, D, T, device="cuda")
    scores = cuda.indexer_scores_bmm(q, k, w, n_visible)
    fused = cuda.indexer_topk_triton(q, k, w, n_visible, topk)
    from ascend.backends import triton_sparse_attn
    torch.testing.assert_close(triton_sparse_attn.indexer_scores(q, k, w, n_visible), scores, rtol=5e-3, atol=5e-2)
    picked = _picked_scores(q, k, w, n_visible, fused)
    ref = _picked_scores(q, k, w, n_visible, REFERENCE.indexer_topk(q, k, w, n_visible, topk))
    # tf32 scores may swap near-ties: the chosen set's scores must still match the best ones closely
    torch.testing.assert_close(picked, ref, rtol=5e-3, atol=5e-2)


@needs_triton
def test_triton_stages_replay_under_cuda_graph():
    kernels = cuda.make_kernels()
    q, kv, idx, sink = _attn_inputs(8, 1, 64, 512, 1024, 640, device="cuda", dtype=torch.bfloat16)
    iq, ik, iw, nv = _indexer_inputs(8, 1, 64, 128, 1024, device="cuda", dtype=torch.bfloat16)

    def step():
        return kernels.sparse_attn(q, kv, idx, sink, 512 ** -0.5), kernels.indexer_topk(iq, ik, iw, nv, 512)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_idx = step()
    for _ in range(2):   # fresh inputs in the captured buffers each time
        for t in (q, kv, iq, ik, iw):
            t.copy_(torch.randn_like(t))
        idx.copy_(torch.randint_like(idx, -1, 1024))
        graph.replay()
        out, sel = step()
        torch.testing.assert_close(static_out, out)
        assert torch.equal(static_idx.sort(-1).values, sel.sort(-1).values)


@needs_triton_or_interpreter
def test_merge_blocks_narrow_only_small_grids(monkeypatch):
    """On an H200's 132 SMs at V4's 64 heads x 512: batch-1 decode (16 programs of 16 x 128) gets 256 programs of
    4 heads x 32 dims reading all 20 chunks in one load; batch 8 and 32 keep 16 x 128 and one chunk per load (the
    16-head kernel's 8 and 2 chunks; 16 and 4 for its 64-head setting, whose blocks the merge does not take), the
    loop over 8 chunks or more pipelined, over fewer not."""
    from ascend.backends import triton_sparse_attn
    monkeypatch.setattr(triton_sparse_attn, "sm_count", lambda device: 132)
    assert triton_sparse_attn._merge_blocks(1, 64, 512, 20, "cuda") == (4, 32, 32, 1)
    assert triton_sparse_attn._merge_blocks(8, 64, 512, 4, "cuda") == (16, 128, 1, 1)
    assert triton_sparse_attn._merge_blocks(8, 64, 512, 8, "cuda") == (16, 128, 1, 3)
    assert triton_sparse_attn._merge_blocks(8, 64, 512, 16, "cuda") == (16, 128, 1, 3)
    assert triton_sparse_attn._merge_blocks(32, 64, 512, 2, "cuda") == (16, 128, 1, 1)
    assert triton_sparse_attn._merge_blocks(32, 64, 512, 4, "cuda") == (16, 128, 1, 1)


@needs_triton_or_interpreter
@pytest.mark.parametrize("B,S,H,D,T,K,waves", [(1, 1, 16, 64, 300, 200, 2.0), (1, 2, 20, 48, 100, 70, 2.0),
                                               (2, 1, 8, 32, 50, 96, 2.0), (1, 1, 16, 192, 300, 200, 2.0),
                                               (1, 1, 16, 64, 2100, 2048, 16.0),
                                               (1, 1, 16, 64, 1700, 1600, 16.0)])
def test_triton_sparse_attn_split_and_merged_matches_reference(B, S, H, D, T, K, waves):
    """Few queries and long index lists: the list is split over programs and the partials merged (several head
    blocks, a head count and a head dim that fill no block, head dims the merge splits into several blocks, an empty
    chunk, a query with no key, and more chunks than the merge reads in one load, the last load partly full)."""
    from ascend.backends import triton_sparse_attn
    q, kv, idx, sink = _attn_inputs(B, S, H, D, T, K, device=TRITON_DEVICE)
    idx[0, 0, :64] = -1
    programs = B * S * -(-H // 16)
    splits = triton_sparse_attn._num_splits(programs, -(-K // 16), q.device, waves)
    per_load = triton_sparse_attn._merge_blocks(B * S, H, D, splits, q.device)[2]
    assert splits > (per_load if waves > 2 else 1)
    out = triton_sparse_attn.sparse_attn(q, kv, idx, sink, D ** -0.5, block_h=16, block_k=16, num_warps=4,
                                         waves=waves)
    ref = REFERENCE.sparse_attn(q.double(), kv.double(), idx, sink.double(), D ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_sparse_attn_config_by_decode_batch_and_list_length():
    """On an H200 (132 SMs, 227 KiB of shared memory) at V4-Flash's 64 heads x 512 in bf16, decode at batch 8-32:
    HCA's lists at 128K context (1,152 entries) and 1M (8,320), and CSA's 640 at batch 32, take the 64-head setting;
    CSA at batch 8 (5K rows in all), HCA at 8K (192 entries) and 32 local heads (two tensor-parallel ranks) the batch
    setting; on sm_90 the 64-head setting with the Gluon wgmma kernel, which also takes long lists at batch 1-4. Batch
    1 otherwise and batch 64 (not measured), a prefill chunk, float32 or 576 dims (tiles too large for both) and an
    sm_89's 99 KiB keep the default."""
    long, batch_config, default = cuda.SPARSE_ATTN_LONG_CONFIG, cuda.SPARSE_ATTN_BATCH_CONFIG, cuda.SPARSE_ATTN_CONFIG
    h200 = (132, 227 << 10)
    for batch, entries in ((8, 1152), (8, 8320), (16, 8320), (32, 1152), (32, 640)):
        assert cuda.sparse_attn_config((batch, 1, 64, 512), entries, 2, *h200) is long
        # on sm_90 its chunks run as the Gluon wgmma kernel; not on sm_100 (no wgmma) nor in float32
        assert cuda.sparse_attn_config((batch, 1, 64, 512), entries, 2, *h200, (9, 0)) is cuda.SPARSE_ATTN_WGMMA_CONFIG
        assert cuda.sparse_attn_config((batch, 1, 64, 512), entries, 2, *h200, (10, 0)) is long
    assert cuda.sparse_attn_config((32, 1, 64, 512), 640, 4, *h200, (9, 0)) is default
    # the Gluon kernel also takes long lists below batch 8 (HCA at 1M: 8,320 entries), not shorter ones
    for batch, entries, want in ((1, 8320, cuda.SPARSE_ATTN_WGMMA_CONFIG), (4, 8320, cuda.SPARSE_ATTN_WGMMA_CONFIG),
                                 (1, 1152, default), (2, 1152, default), (4, 640, default)):
        assert cuda.sparse_attn_config((batch, 1, 64, 512), entries, 2, *h200, (9, 0)) is want
    # ... nor what it cannot run: 8 dims, 576, 32 heads per rank, a prefill chunk, batch 64, an sm_89's 99 KiB
    for shape, entries, device, want in (((1, 1, 64, 8), 8320 * 64, h200, default),
                                         ((8, 1, 64, 576), 8320, h200, default),
                                         ((8, 1, 32, 512), 8320, h200, batch_config),
                                         ((1, 4096, 64, 512), 8320, h200, default),
                                         ((64, 1, 64, 512), 8320, h200, default),
                                         ((8, 1, 64, 512), 8320, (128, 99 << 10), default)):
        assert cuda.sparse_attn_config(shape, entries, 2, *device, (9, 0)) is want
    for shape, entries in (((8, 1, 64, 512), 640), ((32, 1, 64, 512), 192), ((8, 1, 32, 512), 8320)):
        assert cuda.sparse_attn_config(shape, entries, 2, *h200) is batch_config
    for shape, entries, item_bytes, device in (((1, 1, 64, 512), 8320, 2, h200), ((64, 1, 64, 512), 8320, 2, h200),
                                               ((1, 4096, 64, 512), 8320, 2, h200), ((32, 1, 64, 512), 640, 4, h200),
                                               ((8, 1, 64, 576), 8320, 2, h200),
                                               ((8, 1, 64, 512), 8320, 2, (128, 99 << 10))):
        assert cuda.sparse_attn_config(shape, entries, item_bytes, *device) is default


@needs_triton_or_interpreter
@pytest.mark.parametrize("setting,heads", [("LONG", 64), ("BATCH", 16)])
def test_triton_sparse_attn_decode_settings_match_reference(setting, heads):
    """The long-list setting (64 heads per program, 64 keys per step, one round of programs) and the batch setting
    (16 heads, 64 keys per step, one round) split and merge to the reference."""
    from ascend.backends import triton_sparse_attn
    q, kv, idx, sink = _attn_inputs(2, 1, heads, 64, 600, 512, device=TRITON_DEVICE)
    config = getattr(cuda, f"SPARSE_ATTN_{setting}_CONFIG")
    programs = 2 * (heads // config["block_h"])
    assert triton_sparse_attn._num_splits(programs, 512 // config["block_k"], q.device, config["waves"]) > 1
    out = triton_sparse_attn.sparse_attn(q, kv, idx, sink, 64 ** -0.5, **config)
    ref = REFERENCE.sparse_attn(q.double(), kv.double(), idx, sink.double(), 64 ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@needs_triton_or_interpreter
@pytest.mark.parametrize("layer_id", [1, 2])      # tiny: CSA, HCA
def test_attention_layer_with_triton_stages_matches_reference(layer_id):
    """A whole layer (prefill, then decode steps) on the CUDA table with its Triton stages (sparse attention split
    over programs and merged, indexer scores, radix-select top-k) equals the reference layer; under Triton's
    interpreter on CPU tensors where there is no GPU."""
    from ascend.onnx_export import synthetic_attention
    from model.cache import LayerCache
    from model.config import ModelConfig
    from model.kernels import use_kernels

    config = ModelConfig.preset("tiny", quant_sim=False)
    layer = synthetic_attention(config, layer_id, torch.device(TRITON_DEVICE))
    x = torch.randn(2, 20, config.dim, device=TRITON_DEVICE)
    start = torch.zeros(2, dtype=torch.long, device=TRITON_DEVICE)
    outs = []
    for kernels in (REFERENCE, cuda.make_kernels(use_triton=True)):
        use_kernels(layer, kernels)
        cache = LayerCache(config, layer_id, 2, 32, torch.float32, device=TRITON_DEVICE)
        steps = [layer(x[:, :16], start, cache)]
        steps += [layer(x[:, p:p + 1], start + p, cache) for p in range(16, 20)]
        outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer_id", [0, 1, 2])   # tiny: window-only, CSA, HCA
def test_attention_layer_with_cuda_pytorch_stages_matches_reference(layer_id):
    """A whole layer (prefill then decode) built on the CUDA backend's PyTorch stages equals the reference
    layer. Short context, so the indexer keeps every visible entry (no top-k tie can differ)."""
    from ascend.onnx_export import synthetic_attention
    from model.kernels import use_kernels
    from model.cache import LayerCache
    from model.config import ModelConfig

    config = ModelConfig.preset("tiny", quant_sim=False)
    layer = synthetic_attention(config, layer_id)
    x = torch.randn(2, 16, config.dim)
    outs = []
    for kernels in (REFERENCE, cuda.make_kernels(use_triton=False)):
        use_kernels(layer, kernels)
        cache = LayerCache(config, layer_id, 2, 32, torch.float32)
        y = layer(x[:, :15], torch.zeros(2, dtype=torch.long), cache)
        outs.append(torch.cat([y, layer(x[:, 15:], torch.full((2,), 15), cache)], dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@needs_triton
def test_inductor_compiled_decode_with_triton_matches_eager_and_replays():
    """The real thing on the GPU: a tiny CSA layer (indexer, both compressors, FP8 / FP4 simulations, Triton stages
    as custom ops) compiled by inductor equals the eager CUDA layer, and replays from a captured CUDA graph."""
    from ascend.device import get_device
    from ascend.onnx_export import synthetic_attention
    from model.kernels import use_kernels
    from model.config import ModelConfig

    config = ModelConfig.preset("tiny", dtype="bf16")
    layer = synthetic_attention(config, 1, "cuda")
    torch._dynamo.reset()
    with torch.no_grad():
        use_kernels(layer, cuda.make_kernels())
        y_eager, c_eager = _decode_twice(layer, config, 1, layer, "cuda", torch.bfloat16)
        use_kernels(layer, cuda.make_kernels(for_compile=True))
        compiled = cuda.compile_decode(layer)
        y_comp, c_comp = _decode_twice(layer, config, 1, compiled, "cuda", torch.bfloat16)
        err = (y_comp.float() - y_eager.float()).norm() / y_eager.float().norm()
        assert torch.isfinite(y_comp).all() and err < 2e-2, err
        for name in ("kv", "index_kv"):
            a, b = getattr(c_comp, name).float(), getattr(c_eager, name).float()
            assert (a - b).norm() / b.norm() < 2e-2
        # replay: the same two decode steps from captured graphs of the compiled step (capture's warm-up run
        # writes the cache, so its state is restored before the replay)
        graphs = []

        def replayed(x, start, cache):
            state = [t for t in (cache.kv, cache.index_kv, cache.compressor.kv, cache.compressor.score,
                                 cache.index_compressor.kv, cache.index_compressor.score)]
            saved = [t.clone() for t in state]
            graphs.append(get_device("cuda").graph())
            out = graphs[-1].capture(compiled, x, start, cache, warmup=1)
            for t, v in zip(state, saved):
                t.copy_(v)
            graphs[-1].replay()
            return out.clone()
        y_graph, c_graph = _decode_twice(layer, config, 1, replayed, "cuda", torch.bfloat16)
    torch.testing.assert_close(y_graph, y_comp)
    torch.testing.assert_close(c_graph.kv, c_comp.kv)


@needs_triton
@pytest.mark.parametrize("d_out,d_in", [(2048, 4096), (4096, 2048)])        # V4-Flash w1 / w3 and w2
@pytest.mark.parametrize("n", [6, 192])                                     # batch 1 and 32, 6 experts each
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_triton_expert_matmul_at_flash_shapes(d_out, d_in, n, fmt):
    kernels = cuda.make_kernels()
    assert kernels.expert_matmul.func is cuda.expert_matmul_triton
    if fmt not in kernels.expert_matmul.keywords["formats"]:
        pytest.skip("the Triton fp4 / fp8 kernels need sm_89+")
    make = _fp4_experts if fmt == "fp4" else _fp8_experts
    x, weight, scale, idx = make(256 if fmt == "fp4" else 32, d_out, d_in, n, "cuda", torch.bfloat16)
    idx[: n // 3] = 7                                                       # shared experts, as at batch 32
    y = torch.full((n, d_out), float("nan"), device="cuda", dtype=torch.bfloat16)
    y.copy_(kernels.expert_matmul(x, weight, scale, fmt, idx))
    ref = REFERENCE.expert_matmul(x.float(), weight, scale, fmt, idx)
    err = (y.float() - ref).norm() / ref.norm()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and err < 1e-2, err


@needs_triton
@pytest.mark.parametrize("launch", [dict(block_out=16, block_in=256), dict(block_out=64, block_in=1024, num_warps=8),
                                    dict(block_out=8, block_in=512, num_warps=2)])
def test_triton_expert_matmul_fp4_launch_variants(launch):
    """Other launch settings (for tuning EXPERT_MATMUL_CONFIG) compute the same thing."""
    from ascend.backends import triton_moe
    x, weight, scale, idx = _fp4_experts(32, 2048, 4096, 24, "cuda", torch.bfloat16)
    y = triton_moe.expert_matmul_fp4(x, weight, scale, idx, **launch)
    ref = REFERENCE.expert_matmul(x.float(), weight, scale, "fp4", idx)
    assert (y.float() - ref).norm() / ref.norm() < 1e-2


@needs_triton
def test_triton_expert_matmul_replays_under_cuda_graph():
    x, weight, scale, idx = _fp4_experts(16, 256, 512, 12, "cuda", torch.bfloat16)
    kernels = cuda.make_kernels()
    kernels.expert_matmul(x, weight, scale, "fp4", idx)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.expert_matmul(x, weight, scale, "fp4", idx)
    for seed in (1, 2):      # new rows and new expert choices in the captured buffers
        x2, _, _, idx2 = _fp4_experts(16, 256, 512, 12, "cuda", torch.bfloat16, seed=seed)
        x.copy_(x2)
        idx.copy_(idx2)
        graph.replay()
        torch.testing.assert_close(out, kernels.expert_matmul(x, weight, scale, "fp4", idx))
