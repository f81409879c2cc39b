"""Linear layers: stored formats and memory, dequantise-per-use numerics, TP slices against one rank (gloo)."""

import pytest
import torch

from model import quant
from model.linear import ColumnParallelLinear, JointRows, Linear, RowParallelLinear, share_rows
from model.parallel import ExpertSlots, ParallelContext, ParallelError

FORMATS = {  # fmt -> (weight dtype, weight shape, scale dtype, scale shape) for a [256 out, 384 in] layer
    "fp8": (torch.float8_e4m3fn, (256, 384), torch.float8_e8m0fnu, (2, 3)),
    "fp4": (torch.int8, (256, 192), torch.float8_e8m0fnu, (256, 12)),
    "int8": (torch.int8, (256, 384), torch.float32, (256,)),
    "bf16": (torch.bfloat16, (256, 384), None, None),
    "fp32": (torch.float32, (256, 384), None, None),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_format_and_forward(fmt):
    w_dtype, w_shape, s_dtype, s_shape = FORMATS[fmt]
    lin = Linear(384, 256, fmt)
    assert (lin.weight.dtype, tuple(lin.weight.shape)) == (w_dtype, w_shape)
    if s_dtype is None:
        assert lin.scale is None and set(lin.state_dict()) == {"weight"}
    else:
        assert (lin.scale.dtype, tuple(lin.scale.shape)) == (s_dtype, s_shape)
        assert set(lin.state_dict()) == {"weight", "scale"}
    w = torch.randn(256, 384) / 20
    lin.set_from_float(w)
    q, s = quant.quantize_weight(w, fmt)
    assert torch.equal(lin.weight.view(torch.uint8) if lin.weight.element_size() == 1 else lin.weight,
                       q.view(torch.uint8) if q.element_size() == 1 else q)
    x = torch.randn(2, 3, 384)
    want = x @ quant.dequantize_weight(q, s, fmt).T
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    if fmt in ("fp8", "fp4", "bf16"):  # dequantisation is exact: the error is only the format's
        assert torch.equal(lin.dequantized(torch.bfloat16).float(), lin.dequantized(torch.float32))
    # resident bytes are the quantised size
    nbytes = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    assert nbytes == {"fp8": 256 * 384 + 6, "fp4": 256 * 192 + 256 * 12, "int8": 256 * 384 + 256 * 4,
                      "bf16": 256 * 384 * 2, "fp32": 256 * 384 * 4}[fmt]


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        Linear(40, 8, "fp4")
    with pytest.raises(ValueError, match="format"):
        Linear(32, 8, "fp16")
    with pytest.raises(ParallelError, match="output features = 6"):
        ColumnParallelLinear(8, 6, parallel=ParallelContext(tp_rank=0, tp_size=4))
    with pytest.raises(ValueError, match="shape"):
        Linear(8, 8).set_from_float(torch.zeros(8, 4))


def test_expert_slots_default_and_replicated():
    ctx = ParallelContext(ep_rank=1, ep_size=2)
    assert ctx.expert_slots(0, 8) == ExpertSlots((4, 5, 6, 7), (0,) * 4, (1,) * 4)
    # 6 experts in 8 slots: expert 0 and 3 have two replicas; rank 1 holds the second copy of each
    layout = {5: [0, 1, 2, 3, 0, 4, 5, 3]}
    r0 = ParallelContext(ep_rank=0, ep_size=2, phy2log=layout).expert_slots(5, 6)
    r1 = ParallelContext(ep_rank=1, ep_size=2, phy2log=layout).expert_slots(5, 6)
    assert r0 == ExpertSlots((0, 1, 2, 3), (0, 0, 0, 0), (2, 1, 1, 2))
    assert r1 == ExpertSlots((0, 4, 5, 3), (1, 0, 0, 1), (2, 1, 1, 2))
    with pytest.raises(ParallelError, match="phy2log of layer 5"):
        ParallelContext(ep_size=2, phy2log={5: [0, 1, 2]}).expert_slots(5, 6)
    with pytest.raises(ParallelError, match="tp_rank"):
        ParallelContext(tp_rank=2, tp_size=2)


def test_tensor_parallel_slices_recompose_the_full_layer():
    """Column slices concatenate to the full output, row slices' partial sums add up to it (the all-reduce itself
    runs on gloo in tests/model/test_transformer.py::test_tensor_and_expert_parallel_equal_single_rank)."""
    x, w_col, w_row = torch.randn(3, 256), torch.randn(256, 256) / 16, torch.randn(128, 256) / 16
    cols, partials = [], []
    for rank in range(2):
        ctx = ParallelContext(tp_rank=rank, tp_size=2)
        col = ColumnParallelLinear(256, 256, "fp8", parallel=ctx)
        row = RowParallelLinear(256, 128, "fp8", parallel=ctx)
        assert (col.weight.shape, col.scale.shape, row.weight.shape, row.scale.shape) == (
            (128, 256), (1, 2), (128, 128), (1, 1))
        col.set_from_float(w_col.chunk(2, 0)[rank])
        row.set_from_float(w_row.chunk(2, 1)[rank])
        cols.append(col(x))
        partials.append(Linear.forward(row, cols[-1]))     # before the all-reduce
    full_col, full_row = Linear(256, 256, "fp8"), Linear(256, 128, "fp8")
    full_col.set_from_float(w_col)
    full_row.set_from_float(w_row)
    h = full_col(x)
    torch.testing.assert_close(torch.cat(cols, -1), h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(partials), full_row(h), rtol=1e-5, atol=1e-5)


def test_act_quant_rounds_inputs_of_quantised_layers_only():
    x = torch.randn(4, 256) * 3
    for fmt in ("fp8", "fp4", "bf16"):
        lin = Linear(256, 128, fmt)
        lin.set_from_float(torch.randn(128, 256) / 16)
        plain = lin(x)
        lin.act_quant = True
        if fmt == "bf16":
            assert torch.equal(lin(x), plain)
            continue
        # the official FP8 / FP4 GEMM input: e4m3 per 128 values with power-of-two scales
        blocks = x.unflatten(-1, (-1, 128))
        scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True) / 448)))
        xq = ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).flatten(-2)
        torch.testing.assert_close(lin(x), xq @ lin.dequantized(torch.float32).T, rtol=1e-5, atol=1e-5)
        assert not torch.equal(lin(x), plain)


class _Pair(JointRows):
    joint_names = ("a", "b")

    def __init__(self, fmt: str, rows: tuple[int, int]):
        super().__init__()
        self.a, self.b = Linear(384, rows[0], fmt), Linear(384, rows[1], fmt)
        self.join_rows(copy=False)


def test_share_rows_keeps_values_and_makes_views():
    parts = [[torch.randn(3, 4), torch.randn(3, 4)], [torch.randn(2, 4), torch.randn(2, 4)]]
    before = [[t.clone() for t in part] for part in parts]
    joint = share_rows(parts)
    assert joint.shape == (2, 5, 4)
    for j, at in ((0, slice(0, 3)), (1, slice(3, 5))):
        for i in range(2):
            assert torch.equal(joint[i, at], before[j][i]) and parts[j][i].data_ptr() == joint[i, at].data_ptr()


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16"])
def test_joint_rows_equal_each_layer_alone(fmt):
    """One call over the shared tensor gives each layer's own output (split in `joint_names` order); the layers
    stay views of that tensor after loading and after `.to()`, which replaces every parameter."""
    pair = _Pair(fmt, (256, 128))
    weights = {"a": torch.randn(256, 384) / 20, "b": torch.randn(128, 384) / 20}
    for name, w in weights.items():
        getattr(pair, name).set_from_float(w)
    x = torch.randn(2, 3, 384)
    a, b = pair.joint(x)
    torch.testing.assert_close(a, x @ pair.a.dequantized(torch.float32).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, x @ pair.b.dequantized(torch.float32).T, rtol=1e-5, atol=1e-5)
    moved = pair.to(torch.float64)
    weight, scale = moved._joint
    assert moved.a.weight.data_ptr() == weight.data_ptr() and moved.b.weight.data_ptr() == weight[256:].data_ptr()
    assert (scale is None) == (fmt == "bf16")
    if fmt == "bf16":                   # float32 outputs of bf16 weights (compressors) through f32_linear
        fa, fb = moved.joint(x.to(torch.bfloat16), f32=True)
        assert fa.dtype == torch.float32
        torch.testing.assert_close(fb, x.to(torch.bfloat16).float() @ moved.b.weight.float().T)


def test_joint_rows_stay_apart_where_fp8_scale_blocks_would_straddle():
    """FP8 scales cover 128 x 128 blocks: 200 rows end inside one, so the layers keep their own tensors and calls."""
    pair = _Pair("fp8", (200, 128))
    assert pair._joint is None
    pair.a.set_from_float(torch.randn(200, 384) / 20)
    pair.b.set_from_float(torch.randn(128, 384) / 20)
    x = torch.randn(4, 384)
    a, b = pair.joint(x)
    assert torch.equal(a, pair.a(x)) and torch.equal(b, pair.b(x))
