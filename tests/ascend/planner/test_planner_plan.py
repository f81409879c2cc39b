"""Plan: the contract convert/ and the launcher use, and the plan.json round trip."""

import json

import numpy as np
import pytest

from ascend.planner import Plan, PlanError, make_plan
from ascend.planner import placement as pl
from model.config import ModelConfig


@pytest.fixture
def tiny():
    return ModelConfig.preset("tiny")          # 4 layers + 1 MTP, 8 experts, 8 heads, 4 o_groups


def test_make_plan_contract(tiny):
    load = pl.synthetic_load(tiny.n_layers, tiny.n_routed_experts, 1.0, seed=1)
    plan = make_plan(tiny, world_size=4, tp=2, ep=2, redundant=2, expert_load=load)
    assert (plan.dp, plan.slots_per_rank, plan.n_moe_layers, plan.redundant) == (2, 5, 5, 2)
    assert plan.phy2log.shape == (5, 10)
    for layer in range(plan.n_moe_layers):
        held = [plan.experts_on_rank(layer, r) for r in range(4)]
        # ep_rank = rank % ep: ranks 0 and 2 hold the same slots, as do 1 and 3
        assert held[0] == held[2] and held[1] == held[3]
        assert held[0] + held[1] == plan.phy2log[layer].tolist()
        assert set(held[0] + held[1]) == set(range(8))          # every expert somewhere
        assert plan.logcnt[layer].sum() == 10
    assert (plan.dp_rank(3), plan.tp_rank(3), plan.ep_rank(3)) == (1, 1, 1)
    # balance was measured with the given load; MTP layer (index 4) got the mean load of the main layers
    assert np.mean(plan.balance["after"]) >= np.mean(plan.balance["eplb"]) - 1e-12
    with pytest.raises(PlanError):
        plan.experts_on_rank(0, 4)


def test_without_load_is_uniform_and_valid(tiny):
    plan = make_plan(tiny, 2, 1, 2)
    assert plan.slots_per_rank == 4 and plan.balance["load"] == "uniform"
    assert sorted(plan.experts_on_rank(0, 0) + plan.experts_on_rank(0, 1)) == list(range(8))


def test_plan_json_round_trip(tiny, tmp_path):
    plan = make_plan(tiny, 4, 2, 4, redundant=4, expert_load=pl.synthetic_load(4, 8, 2.0))
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert np.array_equal(back.phy2log, plan.phy2log)
    assert back.to_dict() == plan.to_dict()
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["schema"] == "ascend-deploy/plan" and d["version"] == 1
    assert d["mesh"] == {"world_size": 4, "dp": 2, "tp": 2, "ep": 4, "devices_per_node": None, "hardware": None,
                         "rank": "dp_rank * tp + tp_rank", "ep_rank": "rank % ep"}
    layer = d["experts"]["layers"][0]
    for e, slots in enumerate(layer["log2phy"]):
        assert [layer["phy2log"][p] for p in slots] == [e] * layer["logcnt"][e]


def test_plan_load_rejects_bad_files(tiny, tmp_path):
    d = make_plan(tiny, 2, 1, 2).to_dict()
    cases = {
        "version": {**d, "version": 2},
        "schema": {**d, "schema": "other"},
        "log2phy": {**d, "experts": {**d["experts"], "layers": [
            {**d["experts"]["layers"][0], "logcnt": [2] + d["experts"]["layers"][0]["logcnt"][1:]},
            *d["experts"]["layers"][1:]]}},
        "missing": {**d, "experts": {**d["experts"], "layers": [
            {**layer, "phy2log": [0] * len(layer["phy2log"])} for layer in d["experts"]["layers"]]}},
        # hand-edited reports, which `plan show` and the plots read
        "memory": {**d, "memory": {**d["memory"], "per_rank": [{"ranks": [0], "bytes": {}}]}},
        "capacity": {**d, "memory": {**d["memory"], "capacity_bytes": "big"}},
        "balance": {**d, "balance": {**d["balance"], "before": d["balance"]["before"][:1]}},
        "candidates": {**d, "candidates": [{"dp": 1}]},
        "dp": {**d, "mesh": {**d["mesh"], "dp": "x"}},
    }
    for name, bad in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        with pytest.raises(PlanError) as e:
            Plan.load(tmp_path / f"{name}.json")
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{tmp_path / name}.json: ")
    with pytest.raises(PlanError, match="cannot read"):
        Plan.load(tmp_path / "absent.json")


def test_a_load_of_zeros_is_balanced_everywhere(tiny):
    """Layers no token reached are perfectly balanced before, after, for EPLB and at the bound (the bound read 0)."""
    plan = make_plan(tiny, 4, 2, 4, redundant=4, expert_load=np.zeros((4, 8)))
    assert all(set(v) == {1.0} for k, v in plan.balance.items() if k != "load")


def test_make_plan_rejects_invalid_layouts(tiny):
    with pytest.raises(PlanError, match="tp=3 must divide the 6 devices|tp=3 must divide o_groups"):
        make_plan(tiny, 6, 3, 2)
    with pytest.raises(PlanError, match=r"use --redundant 2"):
        make_plan(tiny, 2, 1, 2, redundant=1)
    with pytest.raises(PlanError, match=r"shape \[3, 8\]"):
        make_plan(tiny, 2, 1, 2, expert_load=np.ones((3, 8)))
    with pytest.raises(PlanError, match="NaN"):
        make_plan(tiny, 2, 1, 2, expert_load=np.full((4, 8), np.nan))
