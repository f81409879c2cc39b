"""scripts/bench_multi_gpu.py --quick under torchrun with 2 Gloo ranks: every layout's greedy tokens equal the
one-process reference, and the expert-exchange byte counts are consistent with the planner's estimate."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_two_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "scripts" / "bench_multi_gpu.py"), "--quick", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "PASS", proc.stdout[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("tiny width")
    # a layout decoded from graphs and eagerly (on a GPU) has two rows: every row is checked, not only the last
    runs = {r["mode"]: r for r in results["runs"]}
    assert list(runs) == ["1 device", "tp2ep1", "tp2ep2", "tp1ep2", "tp2ep2-alltoall"]
    assert results["weights_equal_on_ranks"]
    ref = runs["1 device"]["tokens"]
    for run in results["runs"]:
        name = run["mode"]
        assert run["tokens"] == ref, name
        for s in run["speed"]:
            assert s["tokens_per_s"] > 0 and len(s["peak_gib"]) == (1 if name == "1 device" else 2)
            assert s["conserved"], (name, s)
    # TP (experts whole on both ranks), or TP x EP with the same tokens on both (partial sums all-reduced): no token
    # leaves its rank
    assert runs["tp2ep2"]["exchange"] == "allreduce" and runs["tp2ep2"]["redundant"] == 8
    assert all(s["bytes_per_token"] == 0 for name in ("tp2ep1", "tp2ep2") for s in runs[name]["speed"])
    for name in ("tp1ep2", "tp2ep2-alltoall"):
        run = runs[name]
        assert run["exchange"] == "alltoall" and run["redundant"] == 8 and run["estimate"] > 0
        big = run["speed"][-1]  # batch 4: enough pairs that about (ep-1)/ep of them leave the rank
        assert 0.5 <= big["payload_bytes_per_token"] / run["estimate"] <= 1.5, (name, big)
        assert big["bytes_per_token"] > big["payload_bytes_per_token"]  # + slot ids, gate weights, counts
