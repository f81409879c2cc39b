"""Memory model: byte formulas against model/quant.py, totals against the published checkpoints, sums."""

import math

import pytest
import torch

from ascend.planner import make_plan
from ascend.planner.memory import COMPONENTS, MemorySettings, kv_bytes, linear_bytes, memory_per_rank, weight_bytes
from model import quant
from model.config import ModelConfig


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "int8", "bf16"])
@pytest.mark.parametrize("shape", [(2048, 4096), (4096, 2048), (384, 640)])
def test_linear_bytes_match_the_model_storage_layout(fmt, shape):
    (w_shape, w_dtype), scale = quant.weight_layout(*shape, fmt)
    size = lambda s, dt: math.prod(s) * torch.empty((), dtype=dt).element_size()  # noqa: E731
    expected = size(w_shape, w_dtype) + (size(*scale) if scale else 0)
    assert linear_bytes(*shape, fmt) == expected


@pytest.mark.parametrize("name,published_gb", [("flash", 159.6), ("pro", 864.7)])
def test_weights_add_up_to_the_published_checkpoint(name, published_gb):
    # all experts on one rank (tp 1, slots = E) is the whole model; deepseek-v4.md section 1 gives the
    # checkpoint sizes to 0.1 GB, and model/ holds every tensor as the checkpoint stores it (the head in BF16)
    c = ModelConfig.preset(name)
    total = sum(weight_bytes(c, 1, c.n_routed_experts, "keep").values()) / 1e9
    assert total == pytest.approx(published_gb, abs=0.05)


def test_kv_cache_per_token_matches_the_published_accounting():
    # deepseek-v4.md section 3: 584-byte FP8 entries, CSA ~163 B / token / layer, HCA ~4.6, Flash ~3.5 KB, Pro ~5.0 KB
    flash, pro = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    kv = kv_bytes(flash, "fp8")
    assert kv["entry_bytes"] == 584
    assert kv["per_type"]["csa"] == 584 / 4 + 68 / 4 == 163
    assert kv["per_type"]["hca"] == pytest.approx(4.5625)
    assert kv["layers"] == {"window": 3, "csa": 21, "hca": 20}           # MTP is window-only
    assert kv["per_token"] == 21 * 163 + 20 * 4.5625 == 3514.25
    assert kv_bytes(pro, "fp8")["per_token"] == 30 * 163 + 31 * 4.5625
    assert kv_bytes(flash, "bf16")["entry_bytes"] == 1024


def test_memory_adds_up_and_splits_by_parallelism():
    c = ModelConfig.preset("flash")
    s = MemorySettings(context=8192, batch=10, weights="bf16")
    runs = memory_per_rank(c, world_size=8, tp=2, slots_per_rank=32, s=s)
    # 10 sequences over dp = 4 groups: groups 0-1 hold 3, groups 2-3 hold 2 (ranks 0-3 vs 4-7)
    assert [(r["ranks"], r["sequences"]) for r in runs] == [([0, 3], 3), ([4, 7], 2)]
    a, b = runs[0]["bytes"], runs[1]["bytes"]
    assert list(a) == list(COMPONENTS)
    kv = kv_bytes(c, "fp8")
    assert a["kv_cache"] - b["kv_cache"] == int(3 * (8192 * kv["per_token"] + kv["per_sequence_fixed"])) - \
        int(2 * (8192 * kv["per_token"] + kv["per_sequence_fixed"]))
    # routed experts: 32 slots x 44 MoE layers x (3 BF16 matrices of 4096 x 2048)
    assert a["routed_experts"] == 32 * 44 * 3 * 4096 * 2048 * 2
    # embed and head (both BF16) split over tp = 2
    assert a["embed_head"] == 129280 // 2 * 4096 * 4
    one = weight_bytes(c, 1, 32, "bf16")
    two = weight_bytes(c, 2, 32, "bf16")
    assert two["attention"] < one["attention"] and two["shared_expert"] == one["shared_expert"]
    int8 = weight_bytes(c, 2, 32, "int8")
    assert int8["routed_experts"] == 32 * 44 * (2 * (2048 * 4096 + 4 * 2048) + 4096 * 2048 + 4 * 4096)


def test_plan_memory_matches_its_slots():
    c = ModelConfig.preset("tiny")
    plan = make_plan(c, 4, 2, 4, redundant=4)
    m = plan.memory_of_rank(0)
    # tiny: dim = moe_inter_dim = 256, experts in FP4; 3 slots x 5 MoE layers x 3 matrices
    assert (plan.slots_per_rank, plan.n_moe_layers) == (3, 5)
    assert m["routed_experts"] == 3 * 5 * 3 * linear_bytes(256, 256, "fp4")
