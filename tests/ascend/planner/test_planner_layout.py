"""Layout search: V4 divisibility and fused-operator rules, the cost model, worked examples."""

import pytest

from ascend.hardware import get_hardware
from ascend.planner import PlanError
from ascend.planner.layout import check_layout, divisors, evaluate, plan_deployment, search
from ascend.planner.memory import MemorySettings, memory_per_rank
from model.config import ModelConfig

GiB = 2**30


@pytest.fixture(scope="module")
def flash():
    return ModelConfig.preset("flash")


def test_divisors_ascending_and_complete():
    for n in list(range(1, 400)) + [1_600_000, 2 ** 20, 999_983]:       # squares, a prime, a large world
        small = [d for d in range(1, int(n ** 0.5) + 2) if n % d == 0]
        assert divisors(n) == sorted({*small, *(n // d for d in small)})


def test_divisibility_rules(flash):
    assert check_layout(flash, 16, 8, 16, 0) == []
    assert any("o_groups=8" in p for p in check_layout(flash, 16, 16, 16, 0))     # tp must divide o_groups
    assert any("--redundant 32" in p for p in check_layout(flash, 48, 1, 48, 0))  # 256 % 48 = 16 -> +32
    assert check_layout(flash, 48, 1, 48, 32) == []
    assert any("divide the 12 devices" in p for p in check_layout(flash, 12, 8, 4, 0))


def test_fused_operator_limits():
    a3, a5 = get_hardware("atlas-800-a3"), get_hardware("atlas-950-superpod")
    odd = ModelConfig.preset("tiny", n_heads=12, o_groups=4, dim=1024)
    assert any("fused attention" in p for p in check_layout(odd, 2, 1, 2, 0, hardware=a3))   # 12 heads per rank
    wide = ModelConfig.preset("tiny", index_n_heads=128, dim=1024)
    assert any("indexer" in p for p in check_layout(wide, 2, 1, 2, 0, hardware=a3))         # 128 > 64 on A3
    assert not any("indexer" in p for p in check_layout(wide, 2, 1, 2, 0, hardware=a5))     # fine on 950
    pro = ModelConfig.preset("pro")
    assert any("EP 2-768" in p for p in check_layout(pro, 1024, 1, 1024, 640, hardware=a5))
    assert any("512" in p for p in check_layout(pro, 16, 16, 16, 0, hardware=a3, batch=600))
    tiny = ModelConfig.preset("tiny")                                # hidden 256 < 1024: no fused dispatch
    assert any("hidden size 256" in p for p in check_layout(tiny, 2, 1, 2, 0, hardware=a3))
    assert check_layout(tiny, 2, 1, 1, 0, hardware=a3) == []
    assert check_layout(tiny, 2, 1, 2, 0, hardware=get_hardware("cpu")) == []


def test_cost_model_basics(flash):
    s = MemorySettings(context=4096, batch=16)
    a2 = get_hardware("atlas-800-a2")
    solo = evaluate(flash, 16, 1, 1, 0, a2, s)
    assert solo.comm_us_per_token == 0 and not solo.fits                  # all 256 experts on each rank
    inside = evaluate(flash, 16, 1, 8, 0, a2, s)                         # EP group inside one A2 node
    across = evaluate(flash, 16, 1, 16, 0, a2, s)                        # EP group over both nodes (RoCE)
    assert inside.ep_comm_us_per_token < across.ep_comm_us_per_token
    assert across.peak_bytes < inside.peak_bytes                          # fewer expert slots per rank
    ranked = search(flash, 16, a2, s)
    assert [c.key() for c in ranked] == sorted(c.key() for c in ranked)
    assert all(c.fits for c in ranked[:3]) and ranked[0].fits


def test_worked_example_flash_bf16_128k_one_a3_vs_two_a2(flash):
    """V4-Flash, BF16 weights, 128K context, 16 sequences: 1 x Atlas 800 A3 (16 dies of 64 GiB) vs
    2 x Atlas 800 A2 (16 x 910B, 64 GiB). Same device count and memory per rank; different links.

    A3 winner dp16/tp1/ep16 (all 16 dies share a node, so TP buys nothing): per rank, by hand:
      routed experts 16 slots x 44 MoE layers x 3 x 4096 x 2048 x 2 B = 35,433,480,192 B (33.00 GiB)
      shared expert  44 x 3 x 4096 x 2048 x 2 B                        =  2,214,592,512 B ( 2.06 GiB)
      embed + head   129280 x 4096 x (2 + 2) B, tp 1                  =  2,118,123,520 B ( 1.97 GiB)
      KV cache       1 sequence x 131072 x 3514.25 B (+ 15.5 MB fixed) ~    476,000,000 B ( 0.44 GiB)
      + attention 9.68 GiB (BF16, unsplit), workspace 4.75 GiB, other 0.30 GiB  -> 52.20 GiB, margin 11.80 GiB.
    Two A2: EP traffic that leaves a node crosses 25 GB/s RoCE, so the winner splits tokens with TP8 inside
    each node: dp2/tp8/ep16. Attention and embed/head shrink (2.16 + 0.25 GiB) but each rank now holds
    8 of the 16 sequences (3.55 GiB of KV) -> 45.41 GiB, margin 18.59 GiB. Both fit; A3's layout is cheaper
    to run (15.5 vs 36.8 us of communication per token).
    """
    s = MemorySettings(context=131072, batch=16, weights="bf16")
    a3 = search(flash, 16, get_hardware("atlas-800-a3"), s)[0]
    a2 = search(flash, 16, get_hardware("atlas-800-a2"), s)[0]
    assert (a3.dp, a3.tp, a3.ep, a3.fits) == (16, 1, 16, True)
    assert (a2.dp, a2.tp, a2.ep, a2.fits) == (2, 8, 16, True)
    by_hand = memory_per_rank(flash, 16, 1, 16, s)[0]["bytes"]
    assert (by_hand["routed_experts"], by_hand["shared_expert"], by_hand["embed_head"]) == (
        35_433_480_192, 2_214_592_512, 2_118_123_520)
    assert by_hand["kv_cache"] == pytest.approx(131072 * 3514.25 + 15.5e6, rel=0.01)
    assert a3.peak_bytes / GiB == pytest.approx(52.20, abs=0.01)
    assert a3.margin_bytes / GiB == pytest.approx(11.80, abs=0.01)
    assert a2.margin_bytes / GiB == pytest.approx(18.59, abs=0.01)
    assert a3.comm_us_per_token < a2.comm_us_per_token


def test_does_not_fit_says_by_how_much_and_what_would(flash):
    s = MemorySettings(context=131072, batch=16, weights="bf16")
    with pytest.raises(PlanError) as e:          # BF16 Flash is ~570 GB: 8 x 64 GiB cannot hold it
        plan_deployment(flash, get_hardware("atlas-800-a2"), 8, s, model="flash")
    msg = str(e.value)
    assert "\n" not in msg and "does not fit on 8 x atlas-800-a2" in msg and "GiB more than the 64 GiB" in msg
    assert "leanest layout dp2/tp4/ep8 needs" in msg      # the smallest peak of all layouts
    assert "16 devices (2 nodes)" in msg and "--weights keep" in msg
    with pytest.raises(PlanError, match="no valid layout"):
        plan_deployment(flash, get_hardware("atlas-800-a3"), 16, s, tp=3)
    with pytest.raises(PlanError, match="at most 768"):
        plan_deployment(flash, get_hardware("atlas-900-a3-superpod"), 1024, s)


def test_plan_deployment_tiny_on_two_cpu_devices():
    tiny = ModelConfig.preset("tiny")
    plan = plan_deployment(tiny, get_hardware("cpu"), 2, MemorySettings(context=256, batch=2), tp=2, ep=2,
                           redundant=2, model="tiny")
    assert (plan.tp, plan.ep, plan.redundant, plan.slots_per_rank, plan.hardware) == (2, 2, 2, 5, "cpu")
    assert plan.candidates[0]["why"]
    # the ranking used the same memory the plan records
    assert plan.candidates[0]["peak_bytes"] == max(sum(r["bytes"].values()) for r in plan.memory)
    assert plan.capacity_bytes == 8 * GiB                               # the cpu entry's nominal memory
