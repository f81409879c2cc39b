"""The quantised-weight Triton kernels (ascend/backends/triton_moe.py) against model.kernels.REFERENCE.

On CPU they run through Triton's interpreter (TRITON_INTERPRET=1), on the GPU natively; without triton the file skips.
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
BF16_TOL = dict(rtol=2 ** -6, atol=2e-2)      # two bf16 roundings (kernel, reference) apart, fp32 sums


def _stack(fmt, n_experts, d_out, d_in, seed=0):
    """Random stored weights: every e2m1 code (fp4, ue8m0 2^-6 .. 2^1 per 32) or e4m3 values (fp8, ue8m0 2^-3 .. 2^0
    per 128 x 128, ragged edges allowed)."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "fp4":
        weight = torch.randint(-128, 128, (n_experts, d_out, d_in // 2), generator=g, dtype=torch.int8)
        scale = torch.randint(121, 129, (n_experts, d_out, d_in // 32), generator=g, dtype=torch.uint8)
    else:
        weight = (torch.randn(n_experts, d_out, d_in, generator=g) * 8).to(torch.float8_e4m3fn)
        scale = torch.randint(124, 128, (n_experts, -(-d_out // 128), -(-d_in // 128)), generator=g,
                              dtype=torch.uint8)
    return weight.to(DEVICE), scale.view(torch.float8_e8m0fnu).to(DEVICE)


def _rows(n, d_in, dtype, seed=1):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _check(y, x, weight, scale, fmt, idx, half_sums=False):
    """fp32 rows: the reference up to float32 summation order. bf16 rows: the reference in bf16 up to two roundings,
    and the exact products (the reference on the same rows widened to fp32) up to one. `half_sums` (the fp4
    per-selection walk on bf16 rows, which sums each word's products in float16): the exact result up to its float16
    roundings, at most 2^-9 of the sum of the products' magnitudes, and the bf16 output's rounding."""
    ref = REFERENCE.expert_matmul(x, weight, scale, fmt, idx)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        return
    exact = REFERENCE.expert_matmul(x.float(), weight, scale, fmt, idx)
    if half_sums:
        magnitudes = REFERENCE.expert_matmul(x.float().abs(), weight & 0x77, scale, fmt, idx)   # signs cleared
        assert bool(((y.float() - exact).abs() <= 2 ** -9 * magnitudes + 2 ** -8 * exact.abs()).all())
        return
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL)
    torch.testing.assert_close(y.float(), exact, rtol=2 ** -7, atol=1e-3)


def _uneven_experts(n_experts, block_m):
    """Expert ids with expert 0 unused, expert 1 on one row, expert 2 on more rows than one dot tile, the rest spread
    and shuffled (the kernel must not rely on sorted input)."""
    idx = [1] + [2] * (block_m + 3) + [3 + i % (n_experts - 3) for i in range(9)]
    return torch.tensor(idx)[torch.randperm(len(idx), generator=torch.Generator().manual_seed(2))].to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,d_out,d_in,launch", [
    ("fp4", 40, 96, dict(block_out=16, block_m=16, block_in=64)),         # ragged out and in, 5 experts
    ("fp4", 24, 64, dict(block_out=32, block_m=None, block_in=32)),       # block_m from the shapes
    ("fp8", 136, 160, dict(block_out=16, block_m=16, block_in=32)),       # ragged 128-blocks both ways
    ("fp8", 136, 160, dict(block_out=128, block_m=32, block_in=128)),
    ("fp4", 40, 96, dict(block_out=16, block_m=16, block_in=32, split_k=3)),     # float32 partial sums
    ("fp8", 136, 160, dict(block_out=16, block_m=16, block_in=32, split_k=2)),   # a split across scale blocks
])
def test_grouped_matches_reference(fmt, d_out, d_in, launch, dtype):
    from ascend.backends import triton_moe
    weight, scale = _stack(fmt, 5, d_out, d_in)
    idx = _uneven_experts(5, launch["block_m"] or 16)
    x = _rows(idx.numel(), d_in, dtype)
    grouped = triton_moe.grouped_matmul_fp4 if fmt == "fp4" else triton_moe.grouped_matmul_fp8
    _check(grouped(x, weight, scale, idx, **launch), x, weight, scale, fmt, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,d_in", [("fp4", 128), ("fp4", 96), ("fp8", 128)])
def test_per_selection_kernel(fmt, d_in, dtype):
    """Every e2m1 code at every position of its packed int32 word (fp4 turns four codes of a word into e4m3 bytes
    at once), both ways of reading x (bf16 as int32 pairs, others per input), a ragged last input block (96), and
    rows that do not start 16-byte aligned in memory (copied aligned for the kernel)."""
    from ascend.backends import triton_moe
    weight, scale = _stack(fmt, 3, 40, d_in)
    idx = torch.tensor([2, 0, 2, 1], device=DEVICE)
    x = _rows(1, 4 * d_in + 1, dtype)[0, 1:].view(4, d_in)     # contiguous, 1 element off its allocation
    per_selection = triton_moe.expert_matmul_fp4 if fmt == "fp4" else triton_moe.expert_matmul_fp8
    _check(per_selection(x, weight, scale, idx, block_out=16, block_in=64), x, weight, scale, fmt, idx,
           half_sums=fmt == "fp4")


def test_fp4_walk_scales_each_row_into_float16():
    """The fp4 walk on bf16 rows multiplies in float16 after scaling x by a power of two per program: rows of
    magnitude 1e4 and 1e-20 (float16 alone would overflow / flush them) keep the float16 sums' accuracy, a zero row
    gives zeros, a NaN input gives NaN, and each input split scales its own share."""
    from ascend.backends import triton_moe
    weight, scale = _stack("fp4", 3, 40, 256)
    idx = torch.tensor([2, 0, 1, 2], device=DEVICE)
    x = _rows(4, 256, torch.float32) * torch.tensor([[1e4], [1e-20], [0.0], [1.0]], device=DEVICE)
    x[:, :128] *= torch.tensor([[1.0], [1.0], [1.0], [1e-3]], device=DEVICE)     # split 0 of row 3 much smaller
    x = x.bfloat16()
    for split_k in (1, 2):
        y = triton_moe.expert_matmul_fp4(x, weight, scale, idx, block_out=16, block_in=64, split_k=split_k)
        _check(y, x, weight, scale, "fp4", idx, half_sums=True)
        assert (y[0].abs() > 1e3).any() and (y[1] != 0).any() and (y[2] == 0).all()
    x[3, 5] = float("nan")
    y = triton_moe.expert_matmul_fp4(x, weight, scale, idx, block_out=16, block_in=64)
    assert y[3].isnan().all() and not y[:3].isnan().any()


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_broadcast_rows_are_read_in_place(fmt):
    """A token's input broadcast to its experts (row stride 0, as the MoE passes it) is read where it is, not copied
    per selection first, and gives what its contiguous copy gives, in both kernels."""
    from ascend.backends import triton_moe
    weight, scale = _stack(fmt, 3, 40, 128)
    idx = torch.tensor([2, 0, 1, 2], device=DEVICE)
    x = _rows(1, 128, torch.bfloat16).expand(4, 128)
    assert triton_moe._operands(x, weight, scale)[0].stride(0) == 0
    per_selection = triton_moe.expert_matmul_fp4 if fmt == "fp4" else triton_moe.expert_matmul_fp8
    grouped = triton_moe.grouped_matmul_fp4 if fmt == "fp4" else triton_moe.grouped_matmul_fp8
    for kernel in (per_selection, grouped):
        torch.testing.assert_close(kernel(x, weight, scale, idx), kernel(x.contiguous(), weight, scale, idx),
                                   rtol=0, atol=0)
    _check(per_selection(x, weight, scale, idx), x, weight, scale, fmt, idx, half_sums=fmt == "fp4")


def test_groups_are_static_and_complete():
    """order / starts / counts list every selection once under its expert; `experts` (min(E, N) long, most rows
    first) holds every used expert."""
    from ascend.backends import triton_moe
    idx = torch.tensor([4, 1, 4, 6, 1, 4])
    order, starts, counts, experts = triton_moe._groups(idx, 7, all_valid=False)
    assert counts.tolist() == [0, 2, 0, 0, 3, 0, 1] and starts.tolist() == [0, 0, 2, 2, 2, 5, 5]
    for e in range(7):
        assert (idx[order[starts[e]:starts[e] + counts[e]]] == e).all()
    assert experts.numel() == 6 and experts[:3].tolist() == [4, 1, 6]
    one = triton_moe._groups(torch.tensor([0, 0, 0]), 1, all_valid=True)   # a projection: no sort, one group
    assert [t.tolist() for t in one] == [[0, 1, 2], [0], [3], [0]]


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("split_k", [2, 3])
def test_per_selection_kernel_split_over_inputs(fmt, split_k):
    """The per-selection kernels with their inputs split over programs (float32 partials that the last split of each
    block adds up): the same as the reference, for several selections of several experts and for one projection
    row, one call after another on the same arrival tickets."""
    from ascend.backends import triton_moe
    launch = triton_moe.expert_matmul_fp4 if fmt == "fp4" else triton_moe.expert_matmul_fp8
    weight, scale = _stack(fmt, 5, 40, 384)
    for n, n_experts in ((6, 5), (1, 1)):
        x = _rows(n, 384, torch.float32)
        idx = torch.randint(0, n_experts, (n,), generator=torch.Generator().manual_seed(n)).to(DEVICE)
        w, s = weight[:n_experts], scale[:n_experts]
        _check(launch(x, w, s, idx, block_out=16, block_in=64, split_k=split_k), x, w, s, fmt, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_f32_gemv_matches_reference(dtype, split_k):
    """The plain-weight walk (`kernels.f32_linear`: no scales, float32 out) for one row and for two, ragged output
    and input blocks, whole or split over its inputs: the reference's float32 products up to summation order."""
    from ascend.backends import triton_moe
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 200, generator=g).to(DEVICE, dtype)
    for rows in (1, 2):
        x = _rows(rows, 200, dtype, seed=rows)
        y = triton_moe.f32_gemv(x, weight, block_out=16, block_in=64, num_warps=4, split_k=split_k)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, REFERENCE.f32_linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_split_calls_leave_their_tickets_at_zero(grouped):
    """Every split block's last program resets its arrival ticket, so the shared buffer is all zero after a call
    (what the next call, or the next replay of a captured one, relies on)."""
    from ascend.backends import triton_common, triton_moe
    weight, scale = _stack("fp8", 3, 40, 512)
    idx = torch.tensor([2, 0, 2, 1, 0] * 4, device=DEVICE)
    x = _rows(idx.numel(), 512, torch.float32)
    launch = (triton_moe.grouped_matmul_fp8 if grouped else triton_moe.expert_matmul_fp8)
    _check(launch(x, weight, scale, idx, block_out=16, block_in=32, split_k=4), x, weight, scale, "fp8", idx)
    tickets = triton_common._TICKETS[(x.device, "tickets", None)]
    assert tickets and all(t.numel() >= triton_common.TICKETS_MIN and not t.any() for t in tickets)


def test_ticket_buffers_are_never_dropped():
    """A call needing more tickets than any buffer holds gets a new one; the old one stays referenced, since a graph
    captured with it keeps incrementing it at every replay."""
    from ascend.backends import triton_common
    device = torch.empty(0, device=DEVICE).device          # as the launchers see it (cuda:0, not cuda)
    first = triton_common.arrival_tickets(device, 8)
    bigger = triton_common.arrival_tickets(device, triton_common.TICKETS_MIN + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert any(t is first for t in triton_common._TICKETS[(device, "tickets", None)])
    assert triton_common.arrival_tickets(device, 8) is first


def test_ticket_buffers_are_kept_per_stream_lane():
    """Work on two side streams at once must not share tickets (`ascend.device.stream_lane`): each lane has its
    own buffer, the same one each time it is asked again, and the caller's own stream another."""
    from ascend.backends import triton_common
    from ascend.device import get_device
    dev = get_device(DEVICE)
    device = torch.empty(0, device=DEVICE).device
    side, other = _two_streams(dev)
    main = triton_common.arrival_tickets(device, 8)
    with dev.use_stream(side):
        first = triton_common.arrival_tickets(device, 8)
        assert triton_common.arrival_tickets(device, 8) is first
    with dev.use_stream(other):
        second = triton_common.arrival_tickets(device, 8)
    assert len({main.data_ptr(), first.data_ptr(), second.data_ptr()}) == 3
    assert triton_common.arrival_tickets(device, 8) is main


def _two_streams(dev):
    """Two distinct side streams of `dev` (CUDA's pool repeats its streams)."""
    sides = []
    while len(sides) < 2:
        s = dev.stream()
        if not any(s == t for t in sides):
            sides.append(s)
    return sides


@needs_triton
def test_split_projections_on_two_streams_at_once():
    """Split-K one-row projections (the batch-1 compressors and index weights of the streamed decode) on two streams
    at once, both held back so that their launches overlap: every output equals the projection alone, bit for bit.
    With one ticket buffer for both streams the H200 gave 9 wrong outputs of 2,000 (docs/performance.md)."""
    from ascend.backends import triton_moe
    from ascend.device import get_device
    dev = get_device("cuda")
    xs = [_rows(1, 4096, torch.bfloat16, seed=s) for s in (1, 2)]
    ws = [_rows(n, 4096, torch.bfloat16, seed=s) for n, s in ((1024, 3), (64, 4))]
    want = [triton_moe.f32_gemv(x, w, **cuda.F32_GEMV_CONFIG) for x, w in zip(xs, ws)]
    sides = _two_streams(dev)
    wrong = 0
    for _ in range(50):
        torch.cuda.synchronize()
        for s in sides:
            with dev.use_stream(s):
                torch.cuda._sleep(2_000_000)                # ~1 ms: both streams' launches queue up behind it
        outs = [[], []]
        for _ in range(20):
            for i, s in enumerate(sides):
                with dev.use_stream(s):
                    outs[i].append(triton_moe.f32_gemv(xs[i], ws[i], **cuda.F32_GEMV_CONFIG))
        torch.cuda.synchronize()
        wrong += sum(not torch.equal(o, want[i]) for i in range(2) for o in outs[i])
    assert wrong == 0


@needs_triton
def test_split_projections_replay_under_cuda_graph():
    """Decode-sized projections whose inputs the backend splits (wq_a-like at 1 row: the per-selection kernel; wo_b
    at 32 rows: the grouped one), captured once and replayed with new rows: every replay equals the eager call bit
    for bit (the partials are added in split order, not by atomics) and the reference to bf16 rounding."""
    from ascend.backends import triton_moe
    for d_out, d_in, rows in ((1024, 4096, 1), (4096, 8192, 32)):
        weight, scale = _stack("fp8", 1, d_out, d_in)
        config = cuda.LINEAR_MATMUL_CONFIG["fp8"]["grouped" if rows > 1 else "gemv"]
        assert triton_moe.split_k_for(d_out // config["block_out"], d_in, config["block_in"], weight.device) > 1
        x = _rows(rows, d_in, torch.bfloat16)
        cuda.linear_triton(x, weight[0], scale[0], "fp8")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = cuda.linear_triton(x, weight[0], scale[0], "fp8")
        for seed in (1, 2, 3):
            x.copy_(_rows(rows, d_in, torch.bfloat16, seed=seed))
            graph.replay()
            assert torch.equal(out, cuda.linear_triton(x, weight[0], scale[0], "fp8"))
            ref = REFERENCE.linear(x.float(), weight[0], scale[0], "fp8")
            assert (out.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_negative_ids_give_zero_rows_on_both_kernels(fmt):
    """A negative expert id (another rank's selection under expert parallelism) selects nothing: zero rows from
    the per-selection and the grouped kernel, with several experts and with one (a projection-like stack)."""
    from ascend.backends import triton_moe
    weight, scale = _stack(fmt, 5, 40, 256)
    x = _rows(10, 256, torch.float32)
    for n_experts in (5, 1):
        idx = torch.tensor([-1, 0, -1, 2, 4, -1, 1, 3, -1, 0]) % (n_experts + 1)
        idx = torch.where(idx == n_experts, -1, idx).to(DEVICE)
        w, s = weight[:n_experts], scale[:n_experts]
        for launch in (triton_moe.expert_matmul_fp4 if fmt == "fp4" else triton_moe.expert_matmul_fp8,
                       triton_moe.grouped_matmul_fp4 if fmt == "fp4" else triton_moe.grouped_matmul_fp8):
            y = launch(x, w, s, idx, block_out=16, block_in=64)
            assert (y[idx < 0] == 0).all() and (y[idx >= 0] != 0).any()
            _check(y, x, w, s, fmt, idx)


def test_block_m_follows_rows_per_expert():
    from ascend.backends import triton_moe
    assert triton_moe.grouped_block_m(192, 256) == 16          # V4-Flash MoE at batch 32
    assert triton_moe.grouped_block_m(32, 1) == 32             # a projection at batch 32
    assert triton_moe.grouped_block_m(1000, 1) == triton_moe.GROUPED_MAX_BLOCK_M
    assert triton_moe.grouped_block_m(40, 2) == 32


@pytest.fixture
def picks(monkeypatch):
    """Record which kernel (`gemv` / `grouped`) the chooser launches."""
    from ascend.backends import triton_moe
    calls = []

    def recorded(name, fn):
        def run(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return run
    monkeypatch.setattr(triton_moe, "_KERNELS", {fmt: (recorded("gemv", gemv), recorded("grouped", grouped))
                                                 for fmt, (gemv, grouped) in triton_moe._KERNELS.items()})
    return calls


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_chooser_picks_by_rows(fmt, picks, monkeypatch):
    """The rule at the table's threshold, then the launches on each side of it at a threshold of 24 rows (the
    table's 768 fp4 rows took 151 s under the interpreter; the rule reads the table at each call)."""
    from ascend.backends import triton_moe
    least = triton_moe.GROUPED_MIN_ROWS[fmt]
    assert not triton_moe.use_grouped(least - 1, 7, fmt) and triton_moe.use_grouped(least, 7, fmt)
    monkeypatch.setitem(triton_moe.GROUPED_MIN_ROWS, fmt, least := 24)
    weight, scale = _stack(fmt, 7, 24, 128)
    for n, n_experts, want in [(least - 1, 7, "gemv"), (least, 7, "grouped"), (1, 1, "gemv"), (3, 1, "grouped"),
                               (0, 7, "gemv")]:
        x = _rows(n, 128, torch.float32)
        idx = torch.randint(0, n_experts, (n,), generator=torch.Generator().manual_seed(n)).to(DEVICE)
        w, s = weight[:n_experts], scale[:n_experts]
        y = triton_moe.expert_matmul(x, w, s, fmt, idx, gemv=dict(block_out=16, block_in=64),
                                     grouped=dict(block_out=16, block_in=64))
        assert picks[-1] == want and triton_moe.use_grouped(n, n_experts, fmt) == (want == "grouped")
        _check(y, x, w, s, fmt, idx)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("rows", [1, min(32, cuda.LINEAR_FUSED_MAX_ROWS), cuda.LINEAR_FUSED_MAX_ROWS])
def test_linear_decode_sizes_match_reference(fmt, rows, picks):
    """Decode-sized projections run the kernels with one "expert": one row per GEMV, more rows grouped (the weight
    decoded once per tile); [B, S, in] inputs keep their leading dims."""
    weight, scale = _stack(fmt, 1, 72, 256, seed=rows)
    x = _rows(rows, 256, torch.float32).view(rows, 1, 256)
    y = cuda.linear_triton(x, weight[0], scale[0], fmt)
    assert y.shape == (rows, 1, 72) and picks == ["gemv" if rows == 1 else "grouped"]
    torch.testing.assert_close(y, REFERENCE.linear(x, weight[0], scale[0], fmt), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_linear_prefill_keeps_the_reference(fmt, picks):
    weight, scale = _stack(fmt, 1, 72, 256)
    x = _rows(cuda.LINEAR_FUSED_MAX_ROWS + 1, 256, torch.float32)
    y = cuda.linear_triton(x, weight[0], scale[0], fmt)
    assert picks == []
    assert torch.equal(y, REFERENCE.linear(x, weight[0], scale[0], fmt))


def _moe_pair(expert_fmt):
    """The same MoE layer (tiny: 8 experts, top 3, fp8 shared expert) on the reference and on the CUDA kernels, every
    submodule included (shared expert -> linear_triton, routed -> expert_matmul)."""
    from model.config import ModelConfig
    from model.kernels import use_kernels
    from model.moe import MoE
    cfg = ModelConfig.preset("tiny", expert_dtype=expert_fmt)
    layers = [MoE(2, cfg), use_kernels(MoE(2, cfg), cuda.make_kernels(use_triton=True))]
    for moe in layers:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in moe.modules():
                if hasattr(m, "set_from_float"):
                    m.set_from_float(torch.randn(m.out_features, m.in_features, generator=g) / 8)
            moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) / 8)
        moe.to(DEVICE).mode = "static"
    return cfg, layers


@pytest.mark.parametrize("expert_fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("path", ["gemv", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_static_path_matches_reference(expert_fmt, path, dtype, picks, monkeypatch):
    """One token (3 selections: per selection) or enough tokens for the grouped kernel (tiny: top 3 of 8; its
    threshold lowered to 48 selections, which the interpreter runs in a sixteenth of the time of fp4's 768)."""
    from ascend.backends import triton_moe
    monkeypatch.setitem(triton_moe.GROUPED_MIN_ROWS, expert_fmt, 48)
    tokens = 1 if path == "gemv" else -(-triton_moe.GROUPED_MIN_ROWS[expert_fmt] // 3)
    cfg, layers = _moe_pair(expert_fmt)
    x = torch.randn(tokens, 1, cfg.dim, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    ids = torch.randint(0, cfg.vocab_size, (tokens, 1), device=DEVICE)
    with torch.no_grad():
        want, got = (moe(x, ids).float() for moe in layers)
    # w1 and w3 (one joint call), then w2, of the routed experts, then of the shared expert (fp8; at most 43 tokens
    # here, so the fused kernels too)
    assert picks == [path] * 2 + ["grouped" if triton_moe.use_grouped(tokens, 1, "fp8") else "gemv"] * 2
    assert (got - want).norm() / want.norm() < (1e-2 if dtype == torch.bfloat16 else 1e-5)


# ------------------------------------------------------------------------------------------------ GPU only
@needs_triton
@pytest.mark.parametrize("fmt,d_out,d_in", [("fp4", 2048, 4096), ("fp4", 4096, 2048), ("fp8", 4096, 8192)])
@pytest.mark.parametrize("launch", [dict(), dict(block_out=128, block_m=32, num_warps=8), dict(block_out=32)])
def test_grouped_at_flash_shapes(fmt, d_out, d_in, launch):
    """V4-Flash expert / projection shapes in bf16, several launch settings (for tuning the configs)."""
    from ascend.backends import triton_moe
    weight, scale = _stack(fmt, 16, d_out, d_in)
    idx = torch.randint(0, 16, (48,), device=DEVICE)
    idx[:20] = 3                                                   # one expert on more rows than a tile
    x = _rows(48, d_in, torch.bfloat16)
    grouped = triton_moe.grouped_matmul_fp4 if fmt == "fp4" else triton_moe.grouped_matmul_fp8
    y = grouped(x, weight, scale, idx, **launch)
    ref = REFERENCE.expert_matmul(x.float(), weight, scale, fmt, idx)
    assert torch.isfinite(y).all() and (y.float() - ref).norm() / ref.norm() < 1e-2


@needs_triton
@pytest.mark.parametrize("rows", [32, 64])
def test_linear_at_flash_shapes_splits_k(rows):
    """wo_b (8192 -> 4096, fp8): few output blocks, so the grouped kernel splits the inputs (float32 partials, added
    up by the last split of each block)."""
    from ascend.backends import triton_moe
    weight, scale = _stack("fp8", 1, 4096, 8192)
    config = cuda.LINEAR_MATMUL_CONFIG["fp8"]["grouped"]
    assert triton_moe.split_k_for(4096 // config["block_out"], 8192, config["block_in"], weight.device) > 1
    x = _rows(rows, 8192, torch.bfloat16)
    y = cuda.linear_triton(x, weight[0], scale[0], "fp8")
    ref = REFERENCE.linear(x.float(), weight[0], scale[0], "fp8")
    assert y.dtype == torch.bfloat16 and (y.float() - ref).norm() / ref.norm() < 1e-2


@needs_triton
def test_grouped_replays_under_cuda_graph():
    """Captured once, replayed with new rows and new expert choices (other groups, other counts)."""
    from ascend.backends import triton_moe
    weight, scale = _stack("fp4", 16, 256, 512)
    x, idx = _rows(48, 512, torch.bfloat16), torch.randint(0, 16, (48,), device=DEVICE)
    triton_moe.expert_matmul(x, weight, scale, "fp4", idx)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_moe.expert_matmul(x, weight, scale, "fp4", idx)
    for seed in (1, 2):
        x.copy_(_rows(48, 512, torch.bfloat16, seed=seed))
        idx.copy_(torch.randint(0, 4 * seed, (48,), device=DEVICE))
        graph.replay()
        torch.testing.assert_close(out, triton_moe.expert_matmul(x, weight, scale, "fp4", idx))


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("grouped", [False, True])
def test_a_shared_grouping_gives_what_each_call_would_compute(fmt, grouped):
    """`group_experts` once, handed to several calls (a MoE layer's w1 / w3 / w2), == each call sorting its own ids,
    on both kernels (5 rows: per selection; the format's grouped threshold + 2: grouped), another rank's -1 ids
    included."""
    from ascend.backends import triton_moe
    n = triton_moe.GROUPED_MIN_ROWS[fmt] + 2 if grouped else 5
    weight, scale = _stack(fmt, 6, 128, 256)
    x = _rows(n, 256, torch.float32)
    idx = torch.randint(-1, 6, (n,), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    groups = triton_moe.group_experts(idx, 6, fmt)
    assert len(groups) == (4 if grouped else 1) and triton_moe.use_grouped(n, 6, fmt) == grouped
    own = triton_moe.expert_matmul(x, weight, scale, fmt, idx)
    torch.testing.assert_close(triton_moe.expert_matmul(x, weight, scale, fmt, idx, groups=groups), own,
                               rtol=0, atol=0)
    _check(own, x, weight, scale, fmt, idx)
    if len(groups) == 4:    # the grouped kernel runs the grouping it is handed: another one moves rows
        other = triton_moe.group_experts(idx.roll(1), 6, fmt)
        assert not torch.equal(triton_moe.expert_matmul(x, weight, scale, fmt, idx, groups=other), own)


@pytest.mark.parametrize("tokens", [1, 20])
def test_strided_groups_are_the_sorted_grouping_of_repeated_ids(tokens):
    """A grouped output projection's ids arange(G).repeat(tokens) need no sort: `strided_groups` lists the same
    rows per group, and the kernels give the same output with it (1 token: per selection, which takes the order
    alone; 20 x 8 rows: grouped, which takes the bounds too)."""
    from ascend.backends import triton_moe
    idx = torch.arange(8, device=DEVICE).repeat(tokens)
    groups = triton_moe.strided_groups(tokens, 8, idx.device, "fp8")
    assert len(groups) == (4 if triton_moe.use_grouped(8 * tokens, 8, "fp8") else 1)     # what expert_matmul will use
    s_order, s_starts, s_counts, _ = triton_moe._groups(idx, 8, all_valid=True)
    if len(groups) == 4:
        _, starts, counts, experts = groups
        assert torch.equal(starts, s_starts) and torch.equal(counts, s_counts)
        assert set(experts.tolist()) == set(range(8))
    for g in range(8):   # each group's rows, in any order within the group
        mine = slice(g * tokens, (g + 1) * tokens)
        assert sorted(groups[0][mine].tolist()) == sorted(s_order[mine].tolist())
    # fp8, the format the groups were made for: at 20 tokens its grouped kernel runs (fp4 would take the per-selection
    # kernel up to 768 rows, which reads the order alone)
    weight, scale = _stack("fp8", 8, 64, 128)
    x = _rows(8 * tokens, 128, torch.float32)
    assert triton_moe.use_grouped(8 * tokens, 8, "fp8") == (tokens == 20)
    torch.testing.assert_close(triton_moe.expert_matmul(x, weight, scale, "fp8", idx, all_valid=True, groups=groups),
                               triton_moe.expert_matmul(x, weight, scale, "fp8", idx, all_valid=True), rtol=0, atol=0)
