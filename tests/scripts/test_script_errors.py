"""The benchmark scripts keep the CLI's error contract (ascend.cli.run_script): a device that is not there is one
`error:` line and exit 2, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("script, args", [("bench_attention", ["--quick"]), ("bench_launch", ["--quick"]),
                                          ("bench_mhc", ["--quick"]), ("bench_moe", ["--quick"]),
                                          ("bench_multi_gpu", ["--quick"]),
                                          ("bench_model", ["--preset", "tiny"])])   # its --quick means CPU
def test_missing_device_is_one_line_exit_2(script, args):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), *args, "--device", "npu"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 2 and p.stderr.startswith("error: --device npu unavailable") and "Traceback" not in p.stderr


@pytest.mark.parametrize("script, args, option", [("bench_model", ["--contexts", "4096,abc"], "--contexts"),
                                                  ("bench_model", ["--batch", "0"], "--batch"),
                                                  ("bench_launch", ["--batches", "1", "-2"], "--batches"),
                                                  ("bench_attention", ["--contexts", "8192,0"], "--contexts"),
                                                  ("bench_moe", ["--batch", "x"], "--batch")])
def test_bad_sizes_are_usage_errors(script, args, option):
    """A size that is not a positive integer is argparse's usage error naming the option (exit 2) before anything
    runs, not a traceback from inside the run."""
    p = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 2 and f"error: argument {option}" in p.stderr and "Traceback" not in p.stderr
