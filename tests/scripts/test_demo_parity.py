"""The verdict of scripts/demo.sh step 8 (its last embedded Python block), on synthetic run files.

The demo itself takes minutes; here only its decision is exercised: the layouts must give the same logits with
the quantisation simulations off; greedy streams may part only where a discontinuity (simulations on) or a
near-tie of the greedy choice explains it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"
ROW = [0.0, 1.0, 0.5]


@pytest.fixture(scope="module")
def verdict_script(tmp_path_factory) -> Path:
    lines = DEMO.read_text().splitlines()
    start = lines.index("""python3 - "$OUT" "$PARTED" <<'EOF'""") + 1
    body = lines[start:lines.index("EOF", start)]
    path = tmp_path_factory.mktemp("demo") / "verdict.py"
    path.write_text("\n".join(body) + "\n")
    return path


def verdict(script: Path, out: Path, off2=None, on2=None, tokens2=(1, 1, 1), gap=0.5) -> tuple[int, str]:
    """Layout 1 gives ROW on every step; layout 2 what is passed. Returns (exit code, last line printed)."""
    files = {"forced-1-off": [ROW] * 3, "forced-2-off": off2 or [ROW] * 3,
             "forced-1-on": [ROW] * 3, "forced-2-on": on2 or [ROW] * 3}
    run1 = [ROW, [0.0, 1.0, 1.0 - gap], ROW]            # step 1: the 1-rank top-2 gap is `gap`
    files["run-1"] = {"results": [{"tokens": [1, 1, 1], "logits": run1}]}
    files["run-2"] = {"results": [{"tokens": list(tokens2), "logits": run1}]}
    for name, obj in files.items():
        (out / f"{name}.json").write_text(json.dumps(obj))
    parted = "3" if list(tokens2) != [1, 1, 1] else "0"
    p = subprocess.run([sys.executable, str(script), str(out), parted], capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout.strip().splitlines()[-1]


def test_equal_streams_and_equal_logits_pass(verdict_script, tmp_path):
    rc, line = verdict(verdict_script, tmp_path)
    assert rc == 0 and line.startswith("PARITY OK: identical greedy tokens")


def test_logits_that_differ_with_simulations_off_fail(verdict_script, tmp_path):
    rc, line = verdict(verdict_script, tmp_path, off2=[ROW, [0.0, 1.0, 0.5002], ROW])
    assert rc == 1 and line.startswith("PARITY FAILED: 2 ranks and 1 rank compute different functions")


def test_streams_parted_by_a_rounding_flip_pass(verdict_script, tmp_path):
    rc, line = verdict(verdict_script, tmp_path, on2=[[0.0, 1.1, 0.5]] * 3, tokens2=(1, 2, 2))
    assert rc == 0 and line.startswith("PARITY OK: the layouts agree to float32 rounding")


def test_streams_parted_without_any_cause_fail(verdict_script, tmp_path):
    rc, line = verdict(verdict_script, tmp_path, tokens2=(1, 2, 2))
    assert rc == 1 and "although the same tokens give the same logits there" in line


def test_streams_parted_at_a_near_tie_pass(verdict_script, tmp_path):
    rc, line = verdict(verdict_script, tmp_path, tokens2=(1, 2, 2), gap=5e-5)
    assert rc == 0 and line.startswith("PARITY OK")
