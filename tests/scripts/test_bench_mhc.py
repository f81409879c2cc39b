"""scripts/bench_mhc.py --quick runs end to end on CPU and reports every stage (the fused column only where Triton
or its interpreter is available)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch


def test_quick_mode_reports_every_stage_as_json(capsys):
    path = Path(__file__).parents[2] / "scripts" / "bench_mhc.py"
    spec = importlib.util.spec_from_file_location("bench_mhc", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench          # dataclasses look their module up there
    spec.loader.exec_module(bench)
    try:
        rc = bench.main(["--quick", "--tokens", "1", "--json"])
    finally:
        torch.set_grad_enabled(True)
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["tokens"]) for r in results["rows"]] == [
        ("hc_pre", 1), ("hc_post", 1), ("pre+post", 1), ("hc_head", 1)]
    assert all(r["reference_us"] > 0 for r in results["rows"])
    if results["fused"]:                    # TRITON_INTERPRET=1: bf16 outputs within about one bf16 rounding
        assert all(r["fused_us"] > 0 and r["rel_err"] < 2e-2 for r in results["rows"])
    assert results["peak_mib"] > 0
