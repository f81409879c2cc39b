"""scripts/bench_attention.py --quick (with the compiled step) runs end to end on CPU and writes its table and results."""

import argparse
import json

import pytest
import torch

from tests.conftest import load_script, run_script


def test_kernel_table_times_both_backend_sparse_attention_settings():
    """The kernel table marks the variant the backend picks for each shape: each of its settings must be a variant."""
    from ascend.backends import cuda
    variants = list(load_script("bench_attention").SPARSE_VARIANTS.values())
    assert all(c in variants for c in (cuda.SPARSE_ATTN_CONFIG, cuda.SPARSE_ATTN_BATCH_CONFIG,
                                       cuda.SPARSE_ATTN_LONG_CONFIG, cuda.SPARSE_ATTN_WGMMA_CONFIG))


def test_quick_mode_writes_table_and_json(tmp_path):
    assert run_script("bench_attention", ["--quick", "--batches", "1", "--contexts", "64", "--no-reference",
                                           "--out", str(tmp_path), "--compile", "on",
                                           "--compile-backend", "aot_eager", "--stub", "indexer_topk"]) == 0
    results = json.loads((tmp_path / "bench_attention.json").read_text())
    assert [(r["layer"], r["batch"], r["context"]) for r in results["decode"]] == [("csa", 1, 64), ("hca", 1, 64)]
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 and r["dense_ms"] > 0 for r in results["decode"])
    # the compiled step (traced as one graph, run on CPU without code generation) gives the eager step's output
    assert all(r["compiled_ms"] > 0 and r["compiled_err"] < 1e-5 for r in results["decode"])
    # and so do its stages compiled apart on streams (in order on CPU), which "best" counts too
    assert all(r["streamed_ms"] > 0 and r["streamed_err"] < 1e-5 for r in results["decode"])
    assert all(r["x_roofline"] * r["roofline_ms"] == pytest.approx(min(r["ms"], r["compiled_ms"], r["streamed_ms"]))
               for r in results["decode"])
    # the block-completing step alone, of each variant, and the best variant's in the table
    assert all(r[f"{v}completing_ms"] > 0 for r in results["decode"] for v in ("", "compiled_", "streamed_"))
    assert all(r["best_completing_ms"] == {r["ms"]: r["completing_ms"], r["compiled_ms"]: r["compiled_completing_ms"],
                                           r["streamed_ms"]: r["streamed_completing_ms"]}[min(
                                               r["ms"], r["compiled_ms"], r["streamed_ms"])] for r in results["decode"])
    assert set(results["prefill"]) == {"csa", "hca"} and results["kernels"] and not results["failures"]
    stages = {(r["kernel"], r["layer"]) for r in results["kernels"]}
    assert {(f"compress_blocks ({what})", layer) for what in ("inside a block", "completing it")
            for layer in ("csa", "hca")} <= stages
    assert {("index_rotate queries", "csa"), ("index_rotate entries", "csa")} <= stages
    # --stub: the CSA steps again with the indexer's selection stood in for; HCA layers have none
    stubbed = {r["layer"]: (r["stubbed_ms"], r["stubbed_compiled_ms"]) for r in results["decode"]}
    assert all(t > 0 for t in stubbed["csa"]) and stubbed["hca"] == (None, None)
    table = (tmp_path / "bench_attention.md").read_text()
    assert "x roofline" in table and "| csa | 1 | 64 |" in table and "indexer_topk in the compiled step us" in table


def test_decode_steps_are_timed_over_the_last_positions_of_a_block():
    """Positions end with the block-completing step (context - 1); an HCA layer's whole block of 128 (V4-Flash), 16
    for CSA and window layers, never more than the context has."""
    positions = load_script("bench_attention").decode_positions
    assert positions(128, 8192, (16, 128)) == list(range(8192 - 128, 8192))
    assert positions(4, 8192, (16, 128)) == list(range(8192 - 16, 8192))
    assert positions(0, 8192, (16, 128)) == list(range(8192 - 16, 8192))
    assert positions(128, 64, (2, 4)) == [60, 61, 62, 63] and positions(128, 3, (2, 4)) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_cache_snapshot_restores_every_tensor_of_the_layer_cache(kind):
    """What a variant's timed steps write (entries, indexer keys, compressor states) is put back before its output
    is compared with the eager step's."""
    from ascend.device import get_device
    from model.config import ModelConfig
    bench = load_script("bench_attention")
    config = ModelConfig.preset("tiny")
    cache = bench.filled_cache(config, bench.layer_ids(config)[kind], 2, 64, torch.float32, get_device("cpu"))
    tensors = [t for t in (cache.kv, cache.index_kv, cache.compressor.kv, cache.compressor.score)
               + ((cache.index_compressor.kv, cache.index_compressor.score) if kind == "csa" else ()) if t is not None]
    before = [t.clone() for t in tensors]
    restore = bench.cache_snapshot(cache)
    for t in tensors:
        t.fill_(1.0)
    restore()
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_time_ms_of_a_list_is_per_function():
    """Functions timed together run back to back and the time is per function: 3 sleeps of 20 ms read ~20 ms."""
    import time
    from ascend.device import get_device
    bench = load_script("bench_attention")
    ms = bench.time_ms(get_device("cpu"), [lambda: time.sleep(0.02)] * 3, reps=2)
    assert 19 < ms < 40


def test_trials_take_the_median_of_fresh_compiles(tmp_path):
    """--trials 3: each compiled and streamed step compiled and captured three times; the row's time is their median
    and the table shows their range. --layers hca: the HCA layer's rows only."""
    assert run_script("bench_attention", ["--quick", "--batches", "1", "--contexts", "64", "--no-reference",
                                           "--no-kernels", "--no-prefill", "--out", str(tmp_path), "--compile", "on",
                                           "--compile-backend", "aot_eager", "--trials", "3", "--layers", "hca"]) == 0
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["decode"]
    assert [r["layer"] for r in rows] == ["hca"]
    for r in rows:
        for kind in ("compiled", "streamed"):
            times = r[f"{kind}_trials"]
            assert len(times) == 3 and r[f"{kind}_ms"] == sorted(times)[1]
    table = (tmp_path / "bench_attention.md").read_text()
    assert "medians of 3 compiles each" in table and "| streamed range us |" in table


def test_layers_are_csa_or_hca(capsys):
    """--layers: a comma-separated subset of the layer types; anything else is a usage error naming the option."""
    assert load_script("bench_attention").layer_kinds("hca, csa") == ("hca", "csa")
    with pytest.raises(SystemExit) as exit_info:
        run_script("bench_attention", ["--quick", "--layers", "csa,window"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --layers" in err and "window" in err


def test_inductor_options_parse_as_literals():
    """--inductor KEY=VALUE: Python literals where VALUE is one, the string otherwise; no '=' is refused."""
    parse = load_script("bench_attention").inductor_option
    assert parse("combo_kernels=True") == ("combo_kernels", True)
    assert parse("max_fusion_size=128") == ("max_fusion_size", 128)
    assert parse("triton.cudagraphs=False") == ("triton.cudagraphs", False)
    assert parse("mode=fast") == ("mode", "fast")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        parse("combo_kernels")


def test_inductor_options_need_the_inductor_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script("bench_attention", ["--quick", "--compile-backend", "aot_eager", "--inductor", "combo_kernels=True"])
    assert exit_info.value.code == 2 and "--compile-backend aot_eager" in capsys.readouterr().err


def test_table_says_when_its_step_times_were_taken_with_the_profiler():
    bench = load_script("bench_attention")
    ceilings = {"copy_GBps": 4000.0, "matmul_TFLOPs": 800.0, "device": "x", "prefill_tokens": 1, "inductor": {}}
    assert "--profile" not in bench.table([], {}, {**ceilings, "profile_steps": 0})
    assert "with --profile: these step times read slower" in bench.table([], {}, {**ceilings, "profile_steps": 2})
