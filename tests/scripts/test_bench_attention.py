"""scripts/bench_attention.py --quick (with the compiled step) runs end to end on CPU and writes its table and results."""

import importlib.util
import json
import sys
from pathlib import Path

import torch


def test_quick_mode_writes_table_and_json(tmp_path):
    path = Path(__file__).parents[2] / "scripts" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench          # dataclasses look their module up there
    spec.loader.exec_module(bench)
    try:
        rc = bench.main(["--quick", "--batches", "1", "--contexts", "64", "--no-reference", "--out", str(tmp_path),
                         "--compile", "on", "--compile-backend", "aot_eager"])
    finally:
        torch.set_grad_enabled(True)
    assert rc == 0
    results = json.loads((tmp_path / "bench_attention.json").read_text())
    assert [(r["layer"], r["batch"], r["context"]) for r in results["decode"]] == [("csa", 1, 64), ("hca", 1, 64)]
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 and r["dense_ms"] > 0 for r in results["decode"])
    # the compiled step (traced as one graph, run on CPU without code generation) gives the eager step's output
    assert all(r["compiled_ms"] > 0 and r["compiled_err"] < 1e-5 for r in results["decode"])
    assert set(results["prefill"]) == {"csa", "hca"} and results["kernels"] and not results["failures"]
    table = (tmp_path / "bench_attention.md").read_text()
    assert "x roofline" in table and "| csa | 1 | 64 |" in table
