#!/usr/bin/env python3
"""mHC (hyper-connection) stages: the reference PyTorch bodies of `model.kernels` against the fused Triton kernels of
`ascend.backends.triton_mhc`, both measured in the same run, each replayed from a captured graph.

Stages per token count: hc_pre (mixes GEMV, RMS normaliser, 20 Sinkhorn rounds, stream reduction), hc_post (stream
expansion), their round trip (what each sub-block of a layer pays, twice per layer) and hc_head. Columns: microseconds
per call, the speed-up (reference / fused), the fused result's largest deviation from the reference relative to the
reference's largest magnitude (bf16 outputs: ~4e-3 is one bf16 rounding), the kernels one eager call launches (CUDA
only, from the profiler) and the peak memory of the run. `--variants` adds a table of hc_pre launch settings (the
candidates for `triton_mhc.PRE_CONFIG`).

    python3 scripts/bench_mhc.py                       # GPU: V4-Flash shapes (dim 4096, 4 streams), 1, 8, 32 tokens
    python3 scripts/bench_mhc.py --variants --json     # plus launch-setting variants, as JSON
    python3 scripts/bench_mhc.py --quick               # CPU smoke test (fused column via TRITON_INTERPRET=1 only)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ascend.argtypes import positive_list
from ascend.backends.cuda import triton_runs_on
from ascend.device import Device, get_device
from ascend.profiling import kernel_table, replay_us
from model.kernels import REFERENCE


@dataclass(frozen=True)
class Shapes:
    dim: int
    hc_mult: int
    iters: int
    tokens: tuple[int, ...]
    dtype: torch.dtype
    reps: int


FULL = Shapes(4096, 4, 20, (1, 8, 32), torch.bfloat16, 200)    # V4-Flash
QUICK = Shapes(64, 4, 20, (1, 2), torch.bfloat16, 2)
EPS, NORM_EPS = 1e-6, 1e-6
# hc_pre launch settings compared by --variants (PRE_CONFIG is the first unless changed there)
VARIANTS = tuple(dict(zip(("block_k", "block_t", "block_d", "mix_warps"), v))
                 for v in ((128, 8, 512, 1), (256, 8, 512, 1), (128, 8, 1024, 2), (128, 8, 256, 4), (64, 4, 512, 1)))


@dataclass
class Row:
    stage: str
    tokens: int
    reference_us: float
    fused_us: float | None
    rel_err: float | None
    reference_kernels: int | None
    fused_kernels: int | None

    @property
    def speedup(self) -> float | None:
        return None if self.fused_us is None else self.reference_us / self.fused_us


def count_kernels(device: Device, fn) -> int | None:
    """Device kernels one eager call of `fn` launches (CUDA profiler), None elsewhere."""
    if device.type != "cuda":
        return None
    fn()                                   # warm: lazy allocations and kernel builds happen outside the count
    return round(kernel_table(fn, 1)["launches_per_step"])


def inputs(shapes: Shapes, tokens: int, device: Device) -> dict[str, torch.Tensor]:
    """Streams and mHC parameters at the scales `model.transformer.init_random_` uses (mixes of order 1)."""
    n, d = shapes.hc_mult, shapes.dim
    m = (2 + n) * n
    g = torch.Generator().manual_seed(tokens)
    cast = dict(device=device.torch_device)
    return dict(x=torch.randn(1, tokens, n, d, generator=g).to(**cast, dtype=shapes.dtype),
                fn=(torch.randn(m, n * d, generator=g) * (n * d) ** -0.5).to(**cast),
                scale=(0.5 + torch.rand(3, generator=g)).to(**cast),
                base=(0.1 * torch.randn(m, generator=g)).to(**cast),
                head_fn=(torch.randn(n, n * d, generator=g) * (n * d) ** -0.5).to(**cast),
                y=torch.randn(1, tokens, d, generator=g).to(**cast, dtype=shapes.dtype))


def stage_calls(table, a: dict, iters: int) -> dict[str, Callable]:
    """The four measured calls with the stage functions of `table` (REFERENCE or the Triton module)."""
    def pre():
        return table.hc_pre(a["x"], a["fn"], a["scale"], a["base"], iters, EPS, NORM_EPS)

    def post():
        return table.hc_post(a["y"], a["x"], a["post"], a["comb"])

    def round_trip():
        y, p, c = pre()
        return table.hc_post(y, a["x"], p, c)

    def head():
        return table.hc_head(a["x"], a["head_fn"], a["scale"][:1], a["base"][:a["x"].size(2)], EPS, NORM_EPS)

    return {"hc_pre": pre, "hc_post": post, "pre+post": round_trip, "hc_head": head}


def rel_err(got, ref) -> float:
    got, ref = (got, ref) if isinstance(ref, tuple) else ((got,), (ref,))
    return max(((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref))


def measure(shapes: Shapes, device: Device, fused) -> list[Row]:
    rows = []
    for tokens in shapes.tokens:
        a = inputs(shapes, tokens, device)
        _, a["post"], a["comb"] = REFERENCE.hc_pre(a["x"], a["fn"], a["scale"], a["base"], shapes.iters, EPS, NORM_EPS)
        ref_calls = stage_calls(REFERENCE, a, shapes.iters)
        fused_calls = stage_calls(fused, a, shapes.iters) if fused is not None else {}
        for stage, ref_fn in ref_calls.items():
            row = Row(stage, tokens, replay_us(device, ref_fn, shapes.reps), None, None, count_kernels(device, ref_fn),
                      None)
            if stage in fused_calls:
                fused_fn = fused_calls[stage]
                row.fused_us = replay_us(device, fused_fn, shapes.reps)
                row.rel_err = rel_err(fused_fn(), ref_fn())
                row.fused_kernels = count_kernels(device, fused_fn)
            rows.append(row)
    return rows


def measure_variants(shapes: Shapes, device: Device, fused) -> list[dict]:
    out = []
    for tokens in shapes.tokens:
        a = inputs(shapes, tokens, device)
        for v in VARIANTS:
            def call(v=v):
                return fused.launch_hc_pre(a["x"], a["fn"], a["scale"], a["base"], shapes.iters, EPS, NORM_EPS, **v)
            out.append(dict(tokens=tokens, **v, us=replay_us(device, call, shapes.reps)))
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row], variants: list[dict], peak_mib: float) -> str:
    lines = ["| stage | tokens | reference us | fused us | x faster | rel err | kernels ref / fused |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.tokens} | {r.reference_us:.1f} | {_fmt(r.fused_us, '.1f')} | "
                     f"{_fmt(r.speedup, '.1f')} | {_fmt(r.rel_err, '.1e')} | "
                     f"{_fmt(r.reference_kernels, 'd')} / {_fmt(r.fused_kernels, 'd')} |")
    lines.append(f"\npeak memory: {peak_mib:.1f} MiB")
    if variants:
        lines += ["", "| tokens | block_k | block_t | block_d | mix_warps | hc_pre us |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {v['tokens']} | {v['block_k']} | {v['block_t']} | {v['block_d']} | {v['mix_warps']} | "
                  f"{v['us']:.1f} |" for v in variants]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--device", default=None, help="auto|cuda|cpu (default: cpu with --quick, else auto)")
    p.add_argument("--tokens", type=positive_list, default=None)
    p.add_argument("--variants", action="store_true", help="also time hc_pre launch-setting variants")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)

    shapes = QUICK if args.quick else FULL
    if args.tokens:
        shapes = Shapes(shapes.dim, shapes.hc_mult, shapes.iters, args.tokens, shapes.dtype, shapes.reps)
    device = get_device(args.device or ("cpu" if args.quick else None))
    torch.set_grad_enabled(False)
    fused = None
    if triton_runs_on(device.type):
        from ascend.backends import triton_mhc as fused
    device.reset_peak()
    rows = measure(shapes, device, fused)
    variants = measure_variants(shapes, device, fused) if args.variants and fused is not None else []
    peak_mib = device.memory().peak / 2 ** 20
    if args.json:
        print(json.dumps({"device": device.name, "dim": shapes.dim, "hc_mult": shapes.hc_mult, "iters": shapes.iters,
                          "dtype": str(shapes.dtype), "fused": fused is not None, "peak_mib": peak_mib,
                          "rows": [{**asdict(r), "speedup": r.speedup} for r in rows], "variants": variants},
                         indent=1))
    else:
        print(f"{device.name}: dim {shapes.dim}, {shapes.hc_mult} streams, {shapes.iters} Sinkhorn rounds, "
              f"{shapes.dtype}" + ("" if fused is not None else " (fused kernels unavailable here)"))
        print(table(rows, variants, peak_mib))
    return 0


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2
