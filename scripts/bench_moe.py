#!/usr/bin/env python3
"""Quantised-weight matmuls of the static MoE path and of decode-sized projections: the reference (gather,
dequantise, bmm / matmul) against the per-selection GEMV and the grouped tensor-core kernel of
`ascend.backends.triton_moe`, all measured in the same run, each replayed from a captured graph.

Cases (V4-Flash shapes): routed experts in FP4 (256 experts, w1 / w3 = 4096 -> 2048, the two as the one joint
call the model makes (`model.linear.JointRows`), w1+w3 = 4096 -> 4096, and w2 = 2048 -> 4096) with batch x 6
selections (6 distinct random experts per token), FP8 projections with one weight (wq_a 4096 -> 1024, wkv 4096 ->
512, joint wq_a+wkv 4096 -> 1536, the shared expert's w1 / w3 4096 -> 2048 and joint w1+w3 4096 -> 4096, wq_b 1024
-> 32768, wo_b 8192 -> 4096) with batch rows, and float32-output projections of BF16 weights at batch 1
(`kernels.f32_linear`: router 4096 -> 256, compressor wkv 4096 -> 1024, joint wkv+wgate 4096 -> 2048, head 4096
-> 129280), where the reference column is cuBLAS (`cuda.f32_linear_bf16`) and "gemv" the Triton walk
(`triton_moe.f32_gemv`), and BF16 projections of batch rows (a bf16 checkpoint's attention: joint wq_a+wkv 4096 ->
1536, the indexer's weights 4096 -> 64 and wq_b 1024 -> 8192, wq_b 1024 -> 32768, wo_b 8192 -> 4096, and wo_a, 8
groups of 4096 -> 1024, which V4's own checkpoints hold in BF16), where the reference column is cuBLAS (the
reference's matmul / einsum), "plain" `triton_linear.matmul` (up to the 32 rows the backend gives it) and, at one
row of at most 2,048 outputs, "walk" the float32 walk the backend takes there.

Columns: microseconds per call (median of 5 runs of back-to-back replays, each call on weights not in L2: the calls
cycle through copies of the weights, `cold_copies`, as a decode step's other layers would evict them; expert calls
get their ids' ordering made once outside the timed call, as a MoE layer's calls share one), GB/s of the distinct
weight bytes the call must read (packed values + scales of every expert used), speed-up against the reference, the
result's deviation from the reference (|y - ref| / |ref|, bf16: ~4e-3 is one rounding), the peak memory (without
the extra copies), the number of weight copies, and `*` on what the backend runs for that shape
(`triton_moe.use_grouped`, and for projections `cuda.LINEAR_FUSED_MAX_ROWS` / `cuda.plain_matmul_applies`).
`--variants` also times per-selection, grouped and plain launch settings (candidates for cuda.py's
EXPERT_MATMUL_CONFIG / LINEAR_MATMUL_CONFIG / PLAIN_MATMUL_CONFIG);
`--grouped '{"block_out": 128}'` overrides the grouped settings.

    python3 scripts/bench_moe.py --variants                # GPU: V4-Flash shapes, batch 1-512 (experts to 128)
    python3 scripts/bench_moe.py --variants --json > moe.json
    python3 scripts/bench_moe.py --quick                   # CPU smoke test: kernels only with TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import dataclasses
from dataclasses import asdict, dataclass

import torch

from ascend.argtypes import positive_list
from ascend.backends.cuda import triton_runs_on
from ascend.device import Device, get_device
from ascend.profiling import replay_us
from model.kernels import REFERENCE


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str
    n_experts: int           # 1: a projection (rows = batch), else routed experts (rows = batch x topk)
    d_out: int
    d_in: int
    f32_out: bool = False    # bf16: a float32-output projection at one row (`kernels.f32_linear`), else batch rows
    groups: int = 1          # bf16 projections: groups of a grouped projection (wo_a), d_out / d_in per group


@dataclass(frozen=True)
class Shapes:
    cases: tuple[Case, ...]
    batches: tuple[int, ...]
    topk: int
    reps: int
    dtype: torch.dtype       # of the rows (Triton's interpreter cannot take bf16 tl.dot operands)


FULL = Shapes((Case("moe w1/w3", "fp4", 256, 2048, 4096), Case("moe w1+w3", "fp4", 256, 4096, 4096),
               Case("moe w2", "fp4", 256, 4096, 2048),
               Case("wq_a", "fp8", 1, 1024, 4096), Case("wkv", "fp8", 1, 512, 4096),
               Case("wq_a+wkv", "fp8", 1, 1536, 4096), Case("shared w1/w3", "fp8", 1, 2048, 4096),
               Case("shared w1+w3", "fp8", 1, 4096, 4096), Case("wq_b", "fp8", 1, 32768, 1024),
               Case("wo_b", "fp8", 1, 4096, 8192), Case("router", "bf16", 1, 256, 4096, f32_out=True),
               Case("compressor wkv", "bf16", 1, 1024, 4096, f32_out=True),
               Case("compressor wkv+wgate", "bf16", 1, 2048, 4096, f32_out=True),
               Case("head", "bf16", 1, 129280, 4096, f32_out=True),
               Case("wq_a+wkv", "bf16", 1, 1536, 4096), Case("index weights", "bf16", 1, 64, 4096),
               Case("index wq_b", "bf16", 1, 8192, 1024), Case("wq_b", "bf16", 1, 32768, 1024),
               Case("wo_a", "bf16", 1, 1024, 4096, groups=8), Case("wo_b", "bf16", 1, 4096, 8192)),
              (1, 8, 32, 64, 128, 512), 6, 20, torch.bfloat16)
QUICK = Shapes((Case("moe w1/w3", "fp4", 16, 64, 128), Case("wo_b", "fp8", 1, 64, 256),
                Case("router", "bf16", 1, 16, 128, f32_out=True), Case("wo_a", "bf16", 1, 24, 160, groups=3)),
               (1, 4), 2, 1, torch.float32)       # 2 experts per token: the interpreter's fp4 walk is slow
EXPERT_MAX_BATCH = 128
"""Routed experts are timed up to this batch (768 rows): the reference's dequantised copy per selection (rows x
expert size, 26 GB for the joint w1 + w3 here) outgrows the device beyond. The kernels themselves serve any size
(the model's MoE runs them statically at prefill too, `model.moe.STATIC_MAX_SELECTIONS`)."""
GEMV_MAX_ROWS = 64            # a projection's GEMV per row is timed up to here: beyond, a prefill's, pointless
# launch settings timed by --variants, each on top of the backend's current settings for the case
VARIANTS = {"fp4": {"gemv": (dict(block_in=512), dict(block_in=128), dict(block_out=16), dict(block_out=64)),
                    "grouped": (dict(block_out=32), dict(block_out=128, num_warps=8), dict(block_out=16),
                                dict(block_in=128), dict(block_in=512, num_warps=8), dict(num_stages=3),
                                dict(block_m=16), dict(block_m=32))},
            "fp8": {"gemv": (dict(block_out=32, num_warps=4), dict(block_out=16, num_warps=4), dict(block_out=128),
                             dict(block_in=64)),
                    "grouped": (dict(block_out=64), dict(block_out=128, num_warps=8), dict(block_out=16),
                                dict(block_in=64), dict(num_stages=3), dict(block_m=16), dict(block_m=32),
                                dict(split_k=1), dict(split_k=8))}}
VARIANTS["bf16"] = {"gemv": VARIANTS["fp8"]["gemv"],      # f32_gemv: the fp8 walk without scales
                    "plain": (dict(num_stages=3), dict(num_stages=4), dict(block_in=256, num_stages=3),
                              dict(block_out=128, num_warps=8), dict(block_out=128, num_warps=8, num_stages=3),
                              dict(block_out=32, block_in=256, num_stages=3), dict(splits=1), dict(splits=2),
                              dict(splits=4))}


def _named(kind: str, variant: dict) -> str:
    return f"{kind} " + " ".join(f"{k}={v}" for k, v in variant.items())


def settings(kind: str, base: dict, fmt: str, variants: bool) -> dict[str, dict]:
    """Launch settings to time for one kernel `kind` ("gemv" / "grouped" / "plain"): the backend's `base` under the
    kind's name, then with --variants each of VARIANTS[fmt][kind] on top of it."""
    out = {kind: base}
    if variants:
        out.update({_named(kind, v): {**base, **v} for v in VARIANTS[fmt][kind]})
    return out


@dataclass
class Row:
    case: str
    fmt: str
    batch: int
    rows: int
    experts_used: int
    impl: str
    us: float
    gbps: float
    speedup: float           # reference us / us
    rel_err: float
    chosen: bool
    peak_gib: float
    copies: int              # weight copies the timed calls cycle through (`cold_copies`)


def stored_weights(case: Case, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random stored bytes drawn on the device: every e2m1 code with ue8m0 scales 2^-6 .. 2^1 (fp4), or e4m3 values
    with scales 2^-3 .. 2^0 per 128 x 128 (fp8)."""
    dev, e, o, i = device.torch_device, case.n_experts, case.d_out, case.d_in
    g = torch.Generator(dev).manual_seed(0)
    if case.fmt == "fp4":
        w = torch.randint(-128, 128, (e, o, i // 2), generator=g, dtype=torch.int8, device=dev)
        s = torch.randint(121, 129, (e, o, i // 32), generator=g, dtype=torch.uint8, device=dev)
    else:
        w = (torch.randn(e, o, i, generator=g, device=dev) * 8).to(torch.float8_e4m3fn)
        s = torch.randint(124, 128, (e, -(-o // 128), -(-i // 128)), generator=g, dtype=torch.uint8, device=dev)
    return w, s.view(torch.float8_e8m0fnu)


def selections(case: Case, batch: int, topk: int, device: Device) -> torch.Tensor:
    """Expert id per row: `topk` distinct random experts per token, or all zeros for a projection."""
    if case.n_experts == 1:
        return torch.zeros(batch, dtype=torch.int64, device=device.torch_device)
    g = torch.Generator().manual_seed(batch)
    return torch.stack([torch.randperm(case.n_experts, generator=g)[:topk] for _ in range(batch)]).flatten().to(
        device.torch_device)


COLD_L2_MULTIPLE = 2
"""Each timed call reads weights that are not in L2: the calls of one replay go through enough copies of the weights
to move COLD_L2_MULTIPLE x the L2 size between two reads of one copy. (Replaying one call on one weight keeps any
weight smaller than the L2, 60 MB on the H200 as torch reports it, resident, which no decode step does: its ~2 GB
of weights pass between two uses of a layer's.)"""


def cold_copies(weights: tuple, touched: int, device: Device) -> list[tuple]:
    """`weights` and clones of them, as many as it takes for `touched` bytes per call to cycle through
    COLD_L2_MULTIPLE x the device's L2 (one off CUDA)."""
    if device.type != "cuda":
        return [weights]
    l2 = torch.cuda.get_device_properties(device.torch_device).L2_cache_size
    n = max(1, -(-COLD_L2_MULTIPLE * l2 // touched))
    return [weights] + [tuple(t.clone() for t in weights) for _ in range(n - 1)]


def timed(case: Case, batch: int, n: int, used: int, nbytes: int, impls: dict, pick: str, device: Device,
          reps: int, copies: list[tuple]) -> list[Row]:
    """One row per implementation (the first, "reference", is the baseline of the speed-ups and errors), each
    impl(*weights) timed over the `copies` of the weights in turn; peak memory without the extra copies."""
    ref = impls["reference"](*copies[0]).float()
    extra = sum(t.numel() * t.element_size() for ws in copies[1:] for t in ws)
    rows, ref_us = [], None
    for name, fn in impls.items():
        device.reset_peak()
        err = ((fn(*copies[0]).float() - ref).norm() / ref.norm()).item()
        us = replay_us(device, lambda fn=fn: [fn(*ws) for ws in copies], reps) / len(copies)
        ref_us = ref_us or us
        rows.append(Row(case.name, case.fmt, batch, n, used, name, us, nbytes / (us * 1e3), ref_us / us, err,
                        name == pick, (device.memory().peak - extra) / 2 ** 30, len(copies)))
    return rows


def measure_f32_case(case: Case, shapes: Shapes, device: Device, kernels, variants: bool) -> list[Row]:
    """A float32-output projection of a bf16 weight (`kernels.f32_linear`: router, compressor, head) at one row:
    cuBLAS (`cuda.f32_linear_bf16`, the reference column) against the Triton walk (`triton_moe.f32_gemv`)."""
    from ascend.backends import cuda

    if 1 not in shapes.batches:
        return []
    dev = device.torch_device
    weight = torch.randn(case.d_out, case.d_in, generator=torch.Generator(dev).manual_seed(0), device=dev)
    weight = weight.to(torch.bfloat16)
    x = torch.randn(1, case.d_in, generator=torch.Generator().manual_seed(1)).to(dev, torch.bfloat16)
    impls = {"reference": lambda w: cuda.f32_linear_bf16(x, w)}
    if kernels is not None:
        for name, kw in settings("gemv", cuda.F32_GEMV_CONFIG, case.fmt, variants).items():
            impls[name] = lambda w, kw=kw: kernels.f32_gemv(x, w, **kw)
    pick = "gemv" if kernels is not None and cuda.f32_gemv_applies(1, case.d_out) else "reference"
    nbytes = weight.numel() * weight.element_size()
    return timed(case, 1, 1, 1, nbytes, impls, pick, device, shapes.reps, cold_copies((weight,), nbytes, device))


def measure_plain_case(case: Case, shapes: Shapes, device: Device, kernels, variants: bool) -> list[Row]:
    """A bf16 projection of batch rows (attention's, and the grouped wo_a): cuBLAS (the reference's matmul /
    einsum) against `triton_linear.matmul` ("plain", the backend's PLAIN_MATMUL_CONFIG) up to the rows the backend
    gives it (`cuda.PLAIN_MATMUL_MAX_ROWS`), and at one row of few outputs the float32 walk ("walk") that the
    backend takes there instead."""
    from ascend.backends import cuda

    dev, g = device.torch_device, case.groups
    weight = torch.randn(g * case.d_out, case.d_in, generator=torch.Generator(dev).manual_seed(0), device=dev)
    weight = (weight * case.d_in ** -0.5).to(shapes.dtype)
    nbytes = weight.numel() * weight.element_size()
    copies = cold_copies((weight,), nbytes, device)
    rows = []
    for batch in shapes.batches:
        x = torch.randn(batch, g, case.d_in, generator=torch.Generator().manual_seed(1)).to(dev, shapes.dtype)
        if g == 1:
            reference = lambda w: REFERENCE.linear(x[:, 0], w, None, "bf16")             # noqa: E731
        else:
            reference = lambda w: REFERENCE.grouped_linear(x, w, None, "bf16").flatten(1)  # noqa: E731
        impls, pick = {"reference": reference}, "reference"
        if kernels is not None and cuda.plain_matmul_supported() and batch <= cuda.PLAIN_MATMUL_MAX_ROWS:
            from ascend.backends import triton_linear
            for name, kw in settings("plain", cuda.PLAIN_MATMUL_CONFIG, case.fmt, variants).items():
                impls[name] = lambda w, kw=kw: triton_linear.matmul(x, w, **kw).flatten(1)
            if cuda.plain_matmul_applies(batch, case.d_out, x.dtype, weight.dtype):
                pick = "plain"
        if kernels is not None and g == 1 and cuda.f32_gemv_applies(batch, case.d_out):
            impls["walk"] = lambda w: kernels.f32_gemv(x[:, 0], w, **cuda.F32_GEMV_CONFIG).to(x.dtype)
            pick = "walk" if x.dtype == torch.bfloat16 else pick        # `cuda.linear_triton`'s order
        rows += timed(case, batch, batch, 1, nbytes, impls, pick, device, shapes.reps, copies)
        del x
    return rows


def measure_case(case: Case, shapes: Shapes, device: Device, kernels, variants: bool,
                 grouped_override: dict) -> list[Row]:
    from ascend.backends import cuda

    if case.f32_out:
        return measure_f32_case(case, shapes, device, kernels, variants)
    if case.fmt == "bf16":
        return measure_plain_case(case, shapes, device, kernels, variants)
    if case.fmt not in cuda.triton_expert_formats():
        kernels = None          # a GPU the backend runs the reference on for this format (older than sm_89)
    weight, scale = stored_weights(case, device)
    per_expert_bytes = weight[0].numel() * weight.element_size() + scale[0].numel()
    config = (cuda.LINEAR_MATMUL_CONFIG if case.n_experts == 1 else cuda.EXPERT_MATMUL_CONFIG)[case.fmt]
    rows = []
    for batch in shapes.batches:
        if case.n_experts > 1 and batch > EXPERT_MAX_BATCH:
            continue
        idx = selections(case, batch, shapes.topk, device)
        n = idx.numel()
        x = torch.randn(n, case.d_in, generator=torch.Generator().manual_seed(1)).to(device.torch_device,
                                                                                     shapes.dtype)
        used = int(idx.unique().numel())
        if case.n_experts == 1:
            reference = lambda w, s: REFERENCE.linear(x, w[0], s[0], case.fmt)  # noqa: E731
        else:
            reference = lambda w, s: REFERENCE.expert_matmul(x, w, s, case.fmt, idx)  # noqa: E731
        impls = {"reference": reference}
        fused = case.n_experts > 1 or n <= cuda.LINEAR_FUSED_MAX_ROWS
        pick = "reference"
        if kernels is not None:
            if fused:
                pick = "grouped" if kernels.use_grouped(n, case.n_experts, case.fmt) else "gemv"
            gemv = getattr(kernels, f"expert_matmul_{case.fmt}")          # per selection
            grouped = getattr(kernels, f"grouped_matmul_{case.fmt}")
            # the model sorts a MoE layer's ids once for its expert calls (group_experts): the timed calls get the
            # ordering made here, as its calls do (the kernel the backend does not pick sorts its own)
            order = torch.argsort(idx.int()) if case.n_experts > 1 else None
            groups = (kernels.group_experts(idx, case.n_experts, case.fmt)
                      if case.n_experts > 1 and pick == "grouped" else None)
            if case.n_experts > 1 or n <= GEMV_MAX_ROWS:
                for name, kw in settings("gemv", config["gemv"], case.fmt, variants).items():
                    impls[name] = lambda w, s, kw=kw: gemv(x, w, s, idx, order=order, **kw)
            grouped_settings = settings("grouped", config["grouped"], case.fmt, variants)
            grouped_settings["grouped"] = {**config["grouped"], **grouped_override}     # --grouped: the backend's own
            for name, kw in grouped_settings.items():
                impls[name] = lambda w, s, kw=kw: grouped(x, w, s, idx, all_valid=case.n_experts == 1, groups=groups,
                                                          **kw)
        touched = used * per_expert_bytes
        copies = cold_copies((weight, scale), touched, device)
        rows += timed(case, batch, n, used, touched, impls, pick, device, shapes.reps, copies)
        del x, copies
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| case | fmt | batch | rows | experts used | implementation | us | GB/s | x reference | rel err | "
             "peak GiB | weight copies |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " *" if r.chosen else ""
        lines.append(f"| {r.case} | {r.fmt} | {r.batch} | {r.rows} | {r.experts_used} | {r.impl}{mark} | {r.us:.1f} | "
                     f"{r.gbps:.3g} | {r.speedup:.2f} | {r.rel_err:.1e} | {r.peak_gib:.2f} | {r.copies} |")
    return "\n".join(lines)


def best(rows: list[Row]) -> list[dict]:
    """Per (case, batch): the fastest implementation against what the backend runs now (for setting the
    thresholds and launch settings)."""
    out = []
    for key in dict.fromkeys((r.case, r.batch) for r in rows):
        group = [r for r in rows if (r.case, r.batch) == key]
        fastest, chosen = min(group, key=lambda r: r.us), next(r for r in group if r.chosen)
        out.append(dict(case=key[0], batch=key[1], fastest=fastest.impl, fastest_us=fastest.us, chosen=chosen.impl,
                        chosen_us=chosen.us, reference_us=group[0].us))
    return out


def best_table(summary: list[dict]) -> str:
    lines = ["| case | batch | fastest | us | backend runs | us | reference us |", "|---|---:|---|---:|---|---:|---:|"]
    lines += [f"| {b['case']} | {b['batch']} | {b['fastest']} | {b['fastest_us']:.1f} | {b['chosen']} | "
              f"{b['chosen_us']:.1f} | {b['reference_us']:.1f} |" for b in summary]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--device", default=None, help="auto|cuda|cpu (default: cpu with --quick, else auto)")
    p.add_argument("--batch", type=positive_list, default=None,
                   help="comma-separated batch sizes (default 1,8,32,64,128,512; MoE cases stop at "
                        "EXPERT_MAX_BATCH, 128)")
    p.add_argument("--variants", action="store_true",
                   help="also time per-selection, grouped and plain launch-setting variants")
    p.add_argument("--grouped", type=json.loads, default={}, help="JSON overrides of the grouped launch settings")
    p.add_argument("--cases", default=None, metavar="FMT[,FMT]",
                   help="only the cases of these weight formats (fp4, fp8, bf16; default all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)

    shapes = QUICK if args.quick else FULL
    if args.cases:
        formats = set(args.cases.split(","))
        if not formats <= {"fp4", "fp8", "bf16"}:
            p.error(f"--cases {args.cases!r}: expected formats among fp4, fp8, bf16")
        shapes = dataclasses.replace(shapes, cases=tuple(c for c in shapes.cases if c.fmt in formats))
    if args.batch:
        shapes = dataclasses.replace(shapes, batches=tuple(args.batch))
    device = get_device(args.device or ("cpu" if args.quick else None))
    torch.set_grad_enabled(False)
    kernels = None
    if triton_runs_on(device.type):
        from ascend.backends import triton_moe as kernels
    rows = [r for case in shapes.cases for r in measure_case(case, shapes, device, kernels, args.variants,
                                                              args.grouped)]
    if args.json:
        from ascend.backends import cuda
        print(json.dumps({"device": device.name, "kernels": kernels is not None,
                          "grouped_min_rows": kernels.GROUPED_MIN_ROWS if kernels else None,
                          "linear_fused_max_rows": cuda.LINEAR_FUSED_MAX_ROWS,
                          "cases": [asdict(c) for c in shapes.cases], "rows": [asdict(r) for r in rows],
                          "best": best(rows)}, indent=1))
    else:
        print(f"{device.name}: {shapes.dtype} rows, * = what the CUDA backend runs for that shape"
              + ("" if kernels is not None else " (Triton kernels unavailable here: reference only)"))
        print(table(rows))
        print()
        print(best_table(best(rows)))
    return 0


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2
