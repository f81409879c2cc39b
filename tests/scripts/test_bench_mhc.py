"""scripts/bench_mhc.py --quick runs end to end on CPU and reports every stage (the fused column only where Triton
or its interpreter is available)."""

import json

from tests.conftest import run_script


def test_quick_mode_reports_every_stage_as_json(capsys):
    assert run_script("bench_mhc", ["--quick", "--tokens", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["tokens"]) for r in results["rows"]] == [
        ("hc_pre", 1), ("hc_post", 1), ("pre+post", 1), ("hc_head", 1)]
    assert all(r["reference_us"] > 0 for r in results["rows"])
    if results["fused"]:                    # TRITON_INTERPRET=1: bf16 outputs within about one bf16 rounding
        assert all(r["fused_us"] > 0 and r["rel_err"] < 2e-2 for r in results["rows"])
    assert results["peak_mib"] > 0
