"""scripts/bench_moe.py --quick runs end to end on CPU: the reference everywhere, the Triton kernels too where Triton's
interpreter is on (TRITON_INTERPRET=1), each with the chooser's pick marked."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script, run_script


def test_quick_mode_reports_every_case_as_json(capsys):
    assert run_script("bench_moe", ["--quick", "--batch", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    rows = results["rows"]
    assert {r["case"] for r in rows} == {"moe w1/w3", "wo_b", "wo_a"} and all(r["us"] > 0 for r in rows)
    assert [r["rows"] for r in rows if r["impl"] == "reference"] == [4, 2, 2]    # 2 tokens x 2 experts; 2 rows
    for case in ("moe w1/w3", "wo_b", "wo_a"):          # exactly one implementation is what the backend runs
        assert sum(r["chosen"] for r in rows if r["case"] == case) == 1
    assert [(b["case"], b["batch"]) for b in results["best"]] == [("moe w1/w3", 2), ("wo_b", 2), ("wo_a", 2)]
    if results["kernels"]:
        assert {r["impl"] for r in rows} == {"reference", "gemv", "grouped", "plain"}
        assert all(r["rel_err"] < 1e-5 for r in rows)                              # float32 rows
        from ascend.backends.triton_moe import use_grouped
        want = ["grouped" if use_grouped(n, e, fmt) else "gemv" for n, e, fmt in ((4, 16, "fp4"), (2, 1, "fp8"))]
        assert [r["impl"] for r in rows if r["chosen"]] == want + ["reference"]    # float32: not the bf16 kernel


def test_cases_keep_the_formats_asked_for(capsys):
    assert run_script("bench_moe", ["--quick", "--batch", "1", "--cases", "fp8,bf16", "--json"]) == 0
    assert {r["case"] for r in json.loads(capsys.readouterr().out)["rows"]} == {"wo_b", "router", "wo_a"}
    with pytest.raises(SystemExit) as refused:
        run_script("bench_moe", ["--quick", "--cases", "fp5"])
    assert refused.value.code == 2
    assert "--cases 'fp5': expected formats among fp4, fp8, bf16" in capsys.readouterr().err


def test_formats_the_backend_runs_as_reference_are_timed_as_reference_only(capsys, monkeypatch):
    """On a GPU older than sm_89 the backend runs the reference for both quantised formats
    (`cuda.triton_expert_formats` empty): the benchmark then times no kernel it cannot build there."""
    from ascend.backends import cuda
    monkeypatch.setattr(cuda, "triton_expert_formats", lambda: ())
    assert run_script("bench_moe", ["--quick", "--batch", "1", "--cases", "fp4,fp8", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    if not results["kernels"]:
        pytest.skip("no Triton here: every case is timed as reference anyway")
    rows = results["rows"]
    assert rows and {r["impl"] for r in rows} == {"reference"} and all(r["chosen"] for r in rows)


def test_quick_mode_times_the_f32_projection_at_batch_1(capsys):
    """The bf16 case (`kernels.f32_linear`) runs at batch 1 only: cuBLAS's path as the reference, the Triton walk
    next to it where Triton runs, one of them marked as the backend's."""
    assert run_script("bench_moe", ["--quick", "--batch", "1,4", "--cases", "bf16", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["rows"] if r["case"] == "router"]
    assert {r["batch"] for r in rows} == {1} and rows[0]["impl"] == "reference" and sum(r["chosen"] for r in rows) == 1
    if len(rows) > 1:
        assert [r["impl"] for r in rows] == ["reference", "gemv"] and rows[1]["chosen"]
        assert rows[1]["rel_err"] < 1e-5


def test_bf16_projections_time_the_plain_kernel_and_its_variants(capsys):
    """The bf16 projection case (a grouped wo_a here): cuBLAS's path as the reference, then `triton_linear.matmul`
    with the backend's setting and every --variants setting, each matching the reference; float32 rows, so the
    backend's pick is the reference."""
    bench = load_script("bench_moe")
    assert run_script("bench_moe", ["--quick", "--batch", "4", "--cases", "bf16", "--variants", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["rows"] if r["case"] == "wo_a"]
    names = [r["impl"] for r in rows]
    assert names[0] == "reference" and [r["chosen"] for r in rows] == [True] + [False] * (len(rows) - 1)
    if len(names) > 1:
        assert names[1:] == ["plain"] + [bench._named("plain", v) for v in bench.VARIANTS["bf16"]["plain"]]
    assert all(r["rel_err"] < 1e-5 for r in rows)


def test_variants_time_every_setting_of_both_kernels(capsys):
    """--variants: each per-selection and grouped setting of the format's table runs once per case and matches the
    reference like the backend's own."""
    bench = load_script("bench_moe")
    assert run_script("bench_moe", ["--quick", "--batch", "1", "--variants", "--cases", "fp4,fp8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    if not any(r["impl"] == "gemv" for r in rows):
        return                                      # no Triton here: the reference alone, nothing to vary
    for case, fmt in (("moe w1/w3", "fp4"), ("wo_b", "fp8")):
        names = [r["impl"] for r in rows if r["case"] == case]
        want = [bench._named(kind, v) for kind in ("gemv", "grouped") for v in bench.VARIANTS[fmt][kind]]
        assert set(want) <= set(names) and len(names) == len(set(names)) == 3 + len(want)
    assert all(r["rel_err"] < 1e-5 for r in rows)


def test_quick_mode_runs_as_a_script_under_the_interpreter():
    """`python3 scripts/bench_moe.py --quick` with TRITON_INTERPRET=1, outside pytest (no conftest): the backend
    applies Triton 3.6's interpreter fix itself (ascend/backends/triton_common.py), so the kernels' loops run."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_moe.py"), "--quick", "--batch", "1",
                          "--json"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {r["impl"] for r in json.loads(out.stdout)["rows"]} == {"reference", "gemv", "grouped", "plain"}
