#!/usr/bin/env python3
"""Instructions per weight byte in the inner loop of the per-selection quantised-weight kernels, from their sm_90
machine code: no GPU needed.

A GEMV over FP4 or FP8 weights at decode has no tensor-core work: every stored byte is loaded, decoded and
multiplied by CUDA cores, so the instructions the loop issues per byte bound its speed as much as the bytes do (by
arithmetic, an H200 issues at most about 33 T thread-instructions/s, 132 SMs x 4 schedulers x 32 threads x 1.98 GHz,
and about 17 T of the integer ones that decode the codes, whose pipe has 16 lanes per scheduler: at that rate 20 per
byte cap a kernel near 0.8 TB/s, 10 near 1.7). Triton
compiles `ascend/backends/triton_moe.py`'s per-selection kernels here for sm_90a, specialised as a launch on the GPU
specialises them (pointers, sizes and strides divisible by 16; bf16 rows, so the fp4 kernel's packed float16
path), with the ptxas and cuobjdump shipped in Triton's
wheel; the main loop is the longest backward branch of the SASS. Per kernel: registers per thread, instructions in
one loop iteration, stored weight bytes one thread covers per iteration (packed codes; scales excluded), their
ratio, and the commonest opcodes. docs/performance.md uses it for the FP4 decode. `--splits N` compiles the
split-K form (inputs over N programs, the last to arrive adding the partials), whose loop differs by a few
instructions at most; the JSON then also counts the whole kernel's barriers and global atomics (`sync`), the
arrival ticket's instructions.

    python3 scripts/kernel_sass.py                    # the CUDA backend's gemv settings (cuda.EXPERT_MATMUL_CONFIG)
    python3 scripts/kernel_sass.py --fp4 32,512,4 --fp4 32,256,4 --json
    python3 scripts/kernel_sass.py --splits 4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

_WEIGHT = {"fp4": "*i32", "fp8": "*fp8e4nv"}                      # fp4: packed codes read as int32 words
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_BRANCH = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`?\(?)0x([0-9a-f]+)")


HGMMA = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?HGMMA\.(\d+x\d+x\d+)")     # (address, m x n x k)


def loop_span(sass: str) -> tuple[int, int]:
    """Addresses of the longest loop in cuobjdump's SASS: from the target of the backward branch spanning the most
    code to that branch."""
    spans = [(int(to, 16), int(at, 16)) for at, to in _BRANCH.findall(sass) if int(to, 16) < int(at, 16)]
    if not spans:
        raise ValueError("no loop (backward branch) in this SASS")
    return max(spans, key=lambda s: s[1] - s[0])


def loop_mix(sass: str) -> Counter:
    """Opcodes (without modifiers) of the longest loop in cuobjdump's SASS (`loop_span`)."""
    lo, hi = loop_span(sass)
    return Counter(op for at, op in _INSTRUCTION.findall(sass) if lo <= int(at, 16) <= hi)


def opcodes(sass: str) -> Counter:
    """Opcodes (without modifiers) of the whole SASS listing."""
    return Counter(op for _, op in _INSTRUCTION.findall(sass))


def compile_triton(kernel, types: dict[str, str], constexprs: dict, num_warps: int = 4, arch: int = 90,
                   aligned: bool = False, unaligned: tuple[str, ...] = (), num_stages: int | None = None):
    """Triton's offline compile of `kernel` (Triton or Gluon) for CUDA sm_<arch>, down to the cubin with Triton's own
    ptxas (no GPU; in a process without TRITON_INTERPRET). `types`: the arguments' Triton types where they are not
    the default, int32 for scalars and pointers to int32; `constexprs`: every constexpr parameter's value; `aligned`:
    every argument but the `unaligned` ones divisible by 16, as a launch on the GPU specialises them; `num_stages`:
    the launch's pipeline depth where it sets one (Triton's default otherwise)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    signature = {name: "constexpr" if p.is_constexpr else types.get(name, "*i32" if name.endswith("_ptr") else "i32")
                 for name, p in zip(kernel.arg_names, kernel.params)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
             if aligned and kind != "constexpr" and name not in unaligned}
    if "num_warps" in kernel.arg_names:      # a kernel that lays out its own warps takes their count as a constexpr
        constexprs = {**constexprs, "num_warps": num_warps}
    # a Gluon kernel (ascend/backends/gluon_sparse_attn.py) is lowered from its own layouts, a Triton one from Triton's
    ast_source = GluonASTSource if isinstance(kernel, GluonJITFunction) else triton.compiler.ASTSource
    source = ast_source(fn=kernel, signature=signature, attrs=attrs, constexprs=constexprs)
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages else {})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_sass(fmt: str, block_out: int, block_in: int, num_warps: int, splits: int = 1) -> tuple[str, int]:
    """(SASS, registers per thread) of triton_moe's per-selection `fmt` kernel for sm_90a, its inputs over
    `splits` programs."""
    from ascend.backends import triton_moe
    kernel = {"fp4": triton_moe._fp4_expert_matmul_kernel, "fp8": triton_moe._unpacked_expert_matmul_kernel}[fmt]
    # the pointers typed as triton_moe._launch passes them; sizes and strides i32
    types = dict(x_ptr="*bf16", w_ptr=_WEIGHT[fmt], s_ptr="*u8", idx_ptr="*i64", order_ptr="*i64", y_ptr="*bf16",
                 part_ptr="*fp32", tickets_ptr="*i32")
    compiled = compile_triton(kernel, types, {"BLOCK_OUT": block_out, "BLOCK_IN": block_in, "SPLITS": splits,
                                              "PDL": True}, num_warps, aligned=True, unaligned=("sy_split",))
    return disassemble(compiled)


def disassemble(compiled) -> tuple[str, int]:
    """(SASS, registers per thread) of a `compile_triton` result, by the cuobjdump in Triton's wheel."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    return sass, int(re.search(r"REG:(\d+)", usage).group(1))


def measure(fmt: str, block_out: int, block_in: int, num_warps: int, splits: int = 1) -> dict:
    sass, registers = compile_sass(fmt, block_out, block_in, num_warps, splits)
    mix = loop_mix(sass)
    whole = opcodes(sass)
    weight_bytes = block_out * block_in // (2 if fmt == "fp4" else 1) / (32 * num_warps)
    n = sum(mix.values())
    return {"kernel": fmt, "block_out": block_out, "block_in": block_in, "num_warps": num_warps, "splits": splits,
            "sync": {op: whole[op] for op in ("BAR", "ATOMG", "RED", "MEMBAR")}, "registers": registers,
            "loop_instructions": n, "weight_bytes_per_thread": weight_bytes, "instructions_per_byte": n / weight_bytes,
            "mix": dict(mix.most_common())}


def table(rows: list[dict]) -> str:
    lines = ["| kernel | block_out x block_in, warps | registers | loop instructions | weight bytes / thread | "
             "instructions / byte | commonest opcodes |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in list(r["mix"].items())[:6])
        lines.append(f"| {r['kernel']} per selection | {r['block_out']} x {r['block_in']}, {r['num_warps']} | "
                     f"{r['registers']} | {r['loop_instructions']} | {r['weight_bytes_per_thread']:g} | "
                     f"{r['instructions_per_byte']:.2f} | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ascend.backends.cuda import EXPERT_MATMUL_CONFIG

    def setting(text: str) -> tuple[int, int, int]:
        block_out, block_in, num_warps = (int(v) for v in text.split(","))
        return block_out, block_in, num_warps

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for fmt in ("fp4", "fp8"):
        p.add_argument(f"--{fmt}", type=setting, action="append", metavar="OUT,IN,WARPS",
                       help=f"{fmt} kernel settings (repeatable; default: cuda.EXPERT_MATMUL_CONFIG's gemv)")
    p.add_argument("--splits", type=int, default=1, help="programs over the inputs (split-K form; default 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    rows = []
    for fmt in ("fp4", "fp8"):
        default = EXPERT_MATMUL_CONFIG[fmt]["gemv"]
        for block_out, block_in, num_warps in getattr(args, fmt) or [(default["block_out"], default["block_in"],
                                                                       default["num_warps"])]:
            rows.append(measure(fmt, block_out, block_in, num_warps, args.splits))
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2
