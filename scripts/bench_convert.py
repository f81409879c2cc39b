"""Benchmark `ascend convert` against a plain `cp` of the same bytes, and against a load-everything converter.

For each checkpoint size (main layers, e.g. 2 and 4) at V4-Flash width: write a synthetic checkpoint, copy its
shards with `cp` (+ `sync` of the copies, since the converter fsyncs its files) as the baseline, then run
`ascend convert --weights keep` (and bf16 / int8 on the smallest size) and a converter that loads every rank's
state dict before writing it (the official converter's approach). Every run is a child process, so its peak
RSS is measured exactly (wait4). Prints one table; ratios are against the `cp` of the same run.

    python scripts/bench_convert.py                    # Flash width, 32 experts, 2 and 4 layers (~4 and ~5 GB)
    python scripts/bench_convert.py --quick            # tiny model, seconds
    python scripts/bench_convert.py --workdir W --keep-sources   # reuse W's synthetic checkpoints next time
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ascend.argtypes import positive


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a child process; raises on failure."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


_SHA256 = """import hashlib, sys
for name in sys.argv[1:]:
    h = hashlib.sha256()
    with open(name, "rb") as f:
        while chunk := f.read(64 << 20):
            h.update(chunk)
"""


def naive_convert(src: str, out: str) -> None:
    """The load-everything approach: every rank's tensors in memory, then one save_file per rank (tp = ep = 1)."""
    from safetensors.torch import save_file
    from convert.reader import Checkpoint
    ckpt = Checkpoint(src)
    ckpt.validate()
    state = {name: ckpt.read(name) for name in ckpt.tensors}
    Path(out).mkdir(parents=True)
    save_file(state, str(Path(out) / "model0-mp1.safetensors"))
    with open(Path(out) / "model0-mp1.safetensors", "rb+") as f:
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model (seconds), for CI")
    ap.add_argument("--layers", type=positive, nargs="+", default=[2, 4], help="main layers per checkpoint size")
    ap.add_argument("--experts", type=positive, default=32, help="routed experts per layer (Flash has 256)")
    ap.add_argument("--workers", type=positive, default=2)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--keep-sources", action="store_true",
                    help="keep the synthetic checkpoints in --workdir and reuse them in later runs (synth is "
                         "deterministic, so the bytes are the same; writing them takes minutes on 2 cores)")
    ap.add_argument("--naive-convert", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_convert:
        return naive_convert(*args.naive_convert)

    preset, experts = ("tiny", 8) if args.quick else ("flash", args.experts)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "ascend.cli"]
    rows = []

    def measure(label: str, cmd: list[str], out: Path, src_bytes: int, baseline: float | None) -> float:
        seconds, rss = run(cmd)
        out_bytes = du(out) if out.exists() else 0
        rows.append({"run": label, "source_GB": src_bytes / 1e9, "written_GB": out_bytes / 1e9, "seconds": seconds,
                     "GB_per_s": (out_bytes or src_bytes) / 1e9 / seconds, "vs_cp": (baseline / seconds) if baseline else 1.0,
                     "peak_rss_MiB": rss})
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    try:
        for i, layers in enumerate(args.layers):
            src = work / f"src-{preset}-{layers}-{experts}"
            if not (args.keep_sources and (src / "config.json").is_file()):  # config.json is written last
                shutil.rmtree(src, ignore_errors=True)
                run(py + ["synth", "--preset", preset, "--layers", str(layers), "--experts", str(experts),
                          "--out", str(src), "--json"])
            size = du(src)
            cp_out = work / "cp"
            cp_out.mkdir()
            shards = sorted(str(p) for p in src.glob("*.safetensors"))
            base = measure(f"cp + sync, {layers} layers", ["bash", "-c", 'cp "$@" && sync "${@: -1}"/*', "cp",
                                                           *shards, str(cp_out)], cp_out, size, None)
            if i == 0:  # the converter's two floors on this machine: interpreter start, and sha256 of the bytes
                measure("python start + imports", [sys.executable, "-c", "import convert.job, convert.cli"],
                        work / "none", size, base)
                measure(f"sha256 of the source (1 thread), {layers} layers",
                        [sys.executable, "-c", _SHA256, *shards], work / "none", size, base)
            conv = py + ["convert", "--hf", str(src), "--tp", "1", "--ep", "1", "--json", "--workers", str(args.workers)]
            measure(f"convert keep, {layers} layers", conv + ["--out", str(work / "o")], work / "o", size, base)
            if i == 0:
                measure(f"load-all-then-write, {layers} layers",
                        [sys.executable, __file__, "--naive-convert", str(src), str(work / "o")], work / "o", size, base)
                for fmt in ("bf16", "int8"):
                    measure(f"convert {fmt}, {layers} layers", conv + ["--weights", fmt, "--out", str(work / "o")],
                            work / "o", size, base)
                measure(f"convert keep tp2 ep2, {layers} layers",
                        py + ["convert", "--hf", str(src), "--tp", "2", "--ep", "2", "--json", "--workers",
                              str(args.workers), "--out", str(work / "o")], work / "o", size, base)
            if not args.keep_sources:
                shutil.rmtree(src)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"checkpoint: preset {preset}, {experts} experts/layer, {os.cpu_count()} CPUs, workers {args.workers}")
    print(f"{'run':<44} {'source GB':>9} {'written GB':>10} {'seconds':>8} {'GB/s':>6} {'x cp':>6} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['run']:<44} {r['source_GB']:>9.2f} {r['written_GB']:>10.2f} {r['seconds']:>8.1f} "
              f"{r['GB_per_s']:>6.2f} {r['vs_cp']:>6.2f} {r['peak_rss_MiB']:>12.0f}")
    if os.environ.get("BENCH_JSON"):
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2
