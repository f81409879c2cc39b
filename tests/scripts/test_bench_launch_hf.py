"""scripts/bench_launch.py's official -> HF transformers name mapping (runs without transformers installed).

That HF's DeepseekV4ForCausalLM gets every tensor with matching shapes and the same logits is checked by the
script itself at run time (`build_hf_model` refuses any gap) and was checked by hand against transformers 5.17.
"""

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from tests.conftest import load_script


def test_every_official_tensor_has_its_own_hf_target():
    bench = load_script("bench_launch")
    cfg = ModelConfig.preset("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    names = [n for n in model.state_dict() if not n.startswith("mtp.") and not n.endswith(".scale")]
    targets = [bench.hf_target(n, cfg.moe_inter_dim) for n in names]
    assert len({(k, repr(i)) for k, i in targets}) == len(names)           # no HF slot gets two sources
    got = dict(zip(names, targets))
    # routed experts tile HF's stacked tensors: w1 | w3 along dim 1 of gate_up_proj, w2 into down_proj
    inter = cfg.moe_inter_dim
    assert got["layers.1.ffn.experts.5.w1.weight"] == ("model.layers.1.mlp.experts.gate_up_proj", (5, slice(0, inter)))
    assert got["layers.1.ffn.experts.5.w3.weight"] == ("model.layers.1.mlp.experts.gate_up_proj",
                                                       (5, slice(inter, 2 * inter)))
    assert got["layers.1.ffn.experts.5.w2.weight"] == ("model.layers.1.mlp.experts.down_proj", (5,))
    # names as transformers 5.17's module tree spells them (the indexer sits inside the compressor there)
    expect = {
        "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "hc_head_fn": "model.hc_head.hc_fn",
        "layers.0.hc_attn_fn": "model.layers.0.attn_hc.fn", "layers.0.hc_ffn_scale": "model.layers.0.ffn_hc.scale",
        "layers.0.attn.attn_sink": "model.layers.0.self_attn.sinks",
        "layers.0.attn.q_norm.weight": "model.layers.0.self_attn.q_a_norm.weight",
        "layers.0.attn.wo_a.weight": "model.layers.0.self_attn.o_a_proj.weight",
        "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "layers.0.ffn.gate.tid2eid": "model.layers.0.mlp.gate.tid2eid",
        "layers.1.ffn.gate.bias": "model.layers.1.mlp.gate.e_score_correction_bias",
        "layers.1.ffn.shared_experts.w3.weight": "model.layers.1.mlp.shared_experts.up_proj.weight",
        "layers.1.attn.compressor.ape": "model.layers.1.self_attn.compressor.position_bias",
        "layers.1.attn.compressor.norm.weight": "model.layers.1.self_attn.compressor.kv_norm.weight",
        "layers.1.attn.indexer.wq_b.weight": "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight",
        "layers.1.attn.indexer.weights_proj.weight":
            "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
        "layers.1.attn.indexer.compressor.wgate.weight": "model.layers.1.self_attn.compressor.indexer.gate_proj.weight",
    }
    assert {n: got[n][0] for n in expect} == expect
