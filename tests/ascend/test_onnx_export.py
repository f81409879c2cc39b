"""ONNX export of the attention stages: checker-valid graphs that onnxruntime runs to PyTorch's numbers (tiny, fp32)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ascend.onnx_export import (DOMAIN, ExportError, ExportSpec, StageGraph, example_inputs, export_attention,
                                export_config, export_onnx_command, layer_id_for, stage_io, synthetic_attention)

CONFIG = export_config("tiny", None)     # BF16 weights, FP8 / FP4 simulations on (as the model runs)


def _run(path, names, args):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    return sess.run(None, {n: a.numpy() for n, a in zip(names, args) if n in wanted})


def _picked_scores(attn, args, rows):
    """Indexer scores of the chosen entries, sorted (-inf for -1): equal iff the same set was chosen, whatever
    the order and however exact ties (relu makes many scores exactly 0) were broken."""
    x, qr, positions, cos, sin, keys = args
    q = attn.indexer.queries(qr, cos, sin).double()
    w = attn.indexer.weights_proj(x).double() * attn.indexer.weight_scale
    s = (torch.einsum("bshd,btd->bsht", q, keys.double()).relu() * w.unsqueeze(-1)).sum(2)
    s = torch.cat([s, s.new_full(s.shape[:-1] + (1,), float("-inf"))], -1)
    rows = torch.as_tensor(rows).long() - attn.window         # key-buffer rows -> entry ids
    return s.gather(-1, torch.where(rows < 0, s.size(-1) - 1, rows)).sort(-1).values


def _export_and_compare(tmp_path, spec, stages=None):
    layer_id = layer_id_for(CONFIG, spec.layer_type)
    attn = synthetic_attention(CONFIG, layer_id)
    inputs = example_inputs(CONFIG, layer_id, spec)
    manifest = export_attention(CONFIG, spec, tmp_path, stages or ("prolog", "compress", "select", "attend",
                                                                    "epilog", "layer"), attn=attn, inputs=inputs)
    io = stage_io(attn, spec, *inputs)
    for stage in manifest["graphs"]:
        names, args, _ = io[stage]
        got = _run(tmp_path / f"{stage}.onnx", names, args)
        with torch.no_grad():
            want = StageGraph(attn, stage, inputs[3])(*args)
        want = want if isinstance(want, tuple) else (want,)
        assert len(got) == len(want)
        if stage == "select" and attn.indexer is not None:
            torch.testing.assert_close(_picked_scores(attn, args, got[0]), _picked_scores(attn, args, want[0]))
            continue
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape) and g.dtype == w.numpy().dtype
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-3, err_msg=stage)
    return manifest


@pytest.mark.parametrize("layer_type,phase,seq", [("csa", "decode", 1), ("hca", "decode", 1),
                                                  ("window", "prefill", 32), ("hca", "prefill", 24)])
def test_stages_match_pytorch_under_onnxruntime(tmp_path, layer_type, phase, seq):
    spec = ExportSpec(layer_type, phase, batch=2, seq=seq, context=64 if phase == "decode" else 32 + seq % 32)
    manifest = _export_and_compare(tmp_path, spec)
    expected = {"prolog", "attend", "epilog", "layer"} | ({"compress", "select"} if layer_type != "window" else set())
    assert set(manifest["graphs"]) == expected
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_csa_prefill_chunk_selection_and_fused_nodes(tmp_path):
    """A prefill chunk in the middle of a sequence (start 32): the indexer picks the same entries as PyTorch,
    fused stages are ascend.deploy nodes with their attributes, and no TopK has a data-dependent k."""
    spec = ExportSpec("csa", "prefill", batch=2, seq=32, context=64)
    _export_and_compare(tmp_path, spec, stages=("select", "attend"))
    select, attend = onnx.load(str(tmp_path / "select.onnx")), onnx.load(str(tmp_path / "attend.onnx"))
    fused = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for m in (select, attend) for n in m.graph.node if n.domain == DOMAIN}
    assert set(fused) == {"IndexerTopK", "Fp4RoundTrip", "SparseAttention"}   # FP4 simulation of the queries
    assert fused["IndexerTopK"]["topk"] == 4 and fused["Fp4RoundTrip"]["block"] == 32
    assert fused["SparseAttention"]["scale"] == pytest.approx(CONFIG.head_dim ** -0.5)
    assert {(o.domain, o.version) for o in select.opset_import} >= {(DOMAIN, 1), ("", 20)}
    # the documented interface: the table's inputs in its order, dtypes and ranks (a compiler maps them by position
    # onto npu_sparse_flash_attention / npu_lightning_indexer), the sink a graph value, not folded into the body
    elem = onnx.TensorProto
    documented = {
        "SparseAttention": (("q", "kv", "indices", "sink"),
                            [(elem.FLOAT, 4), (elem.FLOAT, 3), (elem.INT32, 3), (elem.FLOAT, 1)], (elem.FLOAT, 4)),
        "IndexerTopK": (("q", "k", "weights", "n_visible"),
                        [(elem.FLOAT, 4), (elem.FLOAT, 3), (elem.FLOAT, 3), (elem.INT64, 2)], (elem.INT32, 3))}
    for model in (select, attend):
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        kinds = {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
                 for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        for n in model.graph.node:
            if n.op_type in documented:
                names, types, out = documented[n.op_type]
                f = next(f for f in model.functions if f.name == n.op_type)
                assert tuple(f.input) == names and [kinds[i] for i in n.input] == types and kinds[n.output[0]] == out
    assert [o.name for o in attend.graph.output] == ["o", "kv_out"]
    sink = next(n for n in attend.graph.node if n.op_type == "SparseAttention").input[3]
    const = next(n for n in attend.graph.node if sink in n.output)
    attn_sink = synthetic_attention(CONFIG, layer_id_for(CONFIG, "csa")).attn_sink.detach().float().numpy()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(const.attribute[0].t), attn_sink)
    for model in (select, attend):
        for f in model.functions:   # every fused body: standard ops, and TopK's k a constant
            assert f.domain == DOMAIN
            constants = {o for n in f.node if n.op_type == "Constant" for o in n.output}
            for n in f.node:
                assert n.domain in ("", "ai.onnx")
                if n.op_type == "TopK":
                    assert n.input[1] in constants


def test_cli_writes_graphs_and_manifest(tmp_path):
    result = CliRunner().invoke(export_onnx_command, ["--preset", "tiny", "--layer-type", "window", "--phase",
                                                      "decode", "--context", "32", "--stages", "prolog,attend",
                                                      "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert sorted(manifest["graphs"]) == ["attend", "prolog"]
    assert manifest["graphs"]["attend"]["inputs"][0] == {"name": "q", "shape": [1, 1, 8, 128], "dtype": "float32"}
    for g in manifest["graphs"].values():
        onnx.checker.check_model(onnx.load(str(tmp_path / g["file"])), full_check=True)
    again = CliRunner().invoke(export_onnx_command, ["--preset", "tiny", "--layer-type", "csa", "--phase", "decode",
                                                     "--out", str(tmp_path)])
    assert again.exit_code != 0 and f"--out {tmp_path}: not empty (holds attend.onnx)" in str(again.exception)


@pytest.mark.parametrize("args, match", [(["--context", "0"], "expected positive"),
                                         (["--stages", " , "], "no stage named"),
                                         (["--stages", "compress,select"], "a window layer has no compress or select")])
def test_bad_options_are_refused(tmp_path, args, match):
    result = CliRunner().invoke(export_onnx_command, ["--preset", "tiny", "--layer-type", "window", "--phase",
                                                      "decode", "--out", str(tmp_path / "o"), *args])
    assert isinstance(result.exception, ExportError) and match in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "x"
    result = CliRunner().invoke(export_onnx_command, ["--preset", "pro", "--layer-type", "window", "--phase",
                                                      "decode", "--out", str(out), "--dry-run"])
    assert result.exit_code == 0 and "layer.onnx" in result.output and not out.exists()


@pytest.mark.parametrize("kwargs,match", [(dict(layer_type="mla", phase="decode"), "--layer-type"),
                                          (dict(layer_type="csa", phase="decode", seq=4), "exactly 1 token"),
                                          (dict(layer_type="csa", phase="prefill", seq=8, context=4), "seq <= context")])
def test_bad_specs_are_user_errors(kwargs, match):
    with pytest.raises(ExportError, match=match):
        ExportSpec(**kwargs)
    with pytest.raises(ExportError, match="exactly one of --preset or --config"):
        export_config(None, None)
