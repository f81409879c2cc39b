"""scripts/kernel_sass.py: the loop finder on hand-written SASS, then a real offline sm_90 compile of both
per-selection kernels (needs Triton's wheel with its ptxas / cuobjdump, no GPU)."""

import json
from pathlib import Path

import pytest

from tests.conftest import load_script, run_without_interpreter

ROOT = Path(__file__).resolve().parents[2]

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LOP3.LUT R2, R2, 0xf, RZ, 0xc0, !PT ;
        /*0020*/                   FFMA R3, R4, R5, R3 ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   HADD2.F32 R6, -RZ, R7.H0_H0 ;
        /*0050*/                   HADD2.F32 R8, -RZ, R7.H1_H1 ;
        /*0060*/                   FFMA R3, R6, R5, R3 ;
        /*0070*/               @P1 BRA 0x40 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_loop_mix_takes_the_longest_backward_branch():
    sass = load_script("kernel_sass")
    mix = sass.loop_mix(SASS)            # 0x40..0x70 (4 instructions) beats 0x10..0x30 (3); BRA 0x90 is no loop
    assert mix == {"HADD2": 2, "FFMA": 1, "BRA": 1}
    with pytest.raises(ValueError, match="no loop"):
        sass.loop_mix(SASS.replace("BRA 0x10", "BRA 0x80").replace("BRA 0x40", "BRA 0x80"))


def _offline(*args: str) -> dict:
    pytest.importorskip("triton")
    out = run_without_interpreter(str(ROOT / "scripts" / "kernel_sass.py"), "--json", *args, timeout=300)
    return {r["kernel"]: r for r in json.loads(out)}


def test_offline_compile_counts_both_kernels():
    rows = _offline()
    assert set(rows) == {"fp4", "fp8"}
    for r in rows.values():
        assert r["loop_instructions"] == sum(r["mix"].values()) > 0
        assert 1 < r["instructions_per_byte"] < 100 and r["registers"] > 0
    assert rows["fp4"]["mix"]["HFMA2"] > 0 and rows["fp4"]["mix"]["F2FP"] > 0   # packed fma; e4m3 -> float16


def test_split_form_fences_its_ticket():
    """The split-K form on sm_90: a CTA barrier after the partial stores, a GPU-scope fence, then the arrival ticket
    (an atomic add) and its reset (an atomic exchange), in both kernels; none of it in the unsplit form."""
    for split, plain in zip(_offline("--splits", "4").values(), _offline().values()):
        assert split["sync"]["BAR"] >= plain["sync"]["BAR"] + 2
        assert split["sync"]["MEMBAR"] >= 1 and split["sync"]["ATOMG"] == 2
        assert plain["sync"]["ATOMG"] == plain["sync"]["MEMBAR"] == 0
