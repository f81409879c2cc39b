"""Exporters: DeepSeek EPLB arrays and the vllm-ascend expert map round-trip to the same placement."""

import json

import numpy as np
import pytest

from ascend.planner import PlanError, make_plan
from ascend.planner import export
from ascend.planner import placement as pl
from model.config import ModelConfig


@pytest.fixture
def plan():
    tiny = ModelConfig.preset("tiny")
    return make_plan(tiny, 4, 1, 4, redundant=4, expert_load=pl.synthetic_load(4, 8, 1.5, seed=2), distinct=True)


def test_eplb_round_trip(plan, tmp_path):
    export.write_eplb(plan, tmp_path / "eplb.npz")
    assert np.array_equal(export.read_eplb(tmp_path / "eplb.npz"), plan.phy2log)
    with np.load(tmp_path / "eplb.npz", allow_pickle=False) as z:
        # EPLB's shapes: phy2log [L, P], log2phy [L, E, max replicas] padded with -1, logcnt [L, E]
        assert z["phy2log"].shape == (5, 12) and z["logcnt"].shape == (5, 8)
        assert z["log2phy"].shape == (5, 8, z["logcnt"].max())
        assert ((z["log2phy"] >= 0).sum(-1) == z["logcnt"]).all()
    arrays = export.eplb_arrays(plan)
    arrays["logcnt"] = arrays["logcnt"] + 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PlanError, match="logcnt disagrees"):
        export.read_eplb(tmp_path / "bad.npz")


def test_vllm_ascend_map_round_trip(plan, tmp_path):
    m = export.vllm_ascend_expert_map(plan)
    assert m["moe_layer_count"] == 4                                   # main layers; MTP is vLLM's draft model
    layer = m["layer_list"][1]
    assert layer["layer_id"] == 1 and layer["device_count"] == 4
    assert layer["device_list"][2] == {"device_id": 2, "device_expert": plan.experts_on_rank(1, 2)}
    (tmp_path / "map.json").write_text(json.dumps(m))
    assert np.array_equal(export.read_vllm_ascend_expert_map(tmp_path / "map.json"), plan.phy2log[:4])
    m["layer_list"][0]["device_count"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(m))
    with pytest.raises(PlanError, match="not a vllm-ascend expert map"):
        export.read_vllm_ascend_expert_map(tmp_path / "bad.json")


def test_vllm_ascend_args(plan):
    args, notes = export.vllm_ascend_args(plan, "map.json")
    assert args[args.index("--tensor-parallel-size") + 1] == "1"
    assert args[args.index("--data-parallel-size") + 1] == "4"
    assert "--enable-expert-parallel" in args
    extra = json.loads(args[args.index("--additional-config") + 1])
    assert extra == {"eplb_config": {"expert_map_path": "map.json", "num_redundant_experts": 4}}
    assert notes == []                                                  # ep == world: vLLM can express it
    _, notes = export.vllm_ascend_args(make_plan(ModelConfig.preset("tiny"), 4, 1, 2), "m.json")
    assert notes and "ep = 2" in notes[0]


def test_vllm_ascend_map_refuses_two_replicas_on_one_device():
    tiny = ModelConfig.preset("tiny")
    plan = make_plan(tiny, 2, 1, 2, redundant=2)
    plan.phy2log[1] = [0, 0, 1, 2, 3, 4, 5, 6, 7, 1]        # rank 0 holds expert 0 twice in layer 1
    with pytest.raises(PlanError, match="MoE layer 1 puts two replicas"):
        export.vllm_ascend_expert_map(plan)
