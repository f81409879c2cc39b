"""Name mapping both ways, over every tensor the published checkpoints hold; the table against published totals."""

import pytest

from convert.layout import expected_tensors
from convert.names import is_hf_style, to_hf, to_official
from model.config import ModelConfig


@pytest.mark.parametrize("preset, n_tensors, gigabytes", [("flash", 69_187, 159.6), ("pro", 145_116, 864.7)])
def test_table_matches_published_checkpoints(preset, n_tensors, gigabytes):
    # deepseek-v4.md §1: Flash 69,187 tensors / 159.6 GB, Pro 145,116 / 864.7 GB on disk
    table = expected_tensors(ModelConfig.preset(preset))
    assert len(table) == n_tensors
    assert round(sum(s.nbytes for s in table.values()) / 1e9, 1) == gigabytes


def test_round_trip_every_name():
    names = list(expected_tensors(ModelConfig.preset("flash")))
    hf = [to_hf(n) for n in names]
    assert len(set(hf)) == len(names)
    assert [to_official(h) for h in hf] == names
    assert [to_official(n) for n in names] == names       # official names pass through unchanged
    assert is_hf_style(hf) and not is_hf_style(names)


@pytest.mark.parametrize("official, hf", [
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("layers.0.attn.wq_a.scale", "model.layers.0.self_attn.q_a_proj.weight_scale_inv"),
    ("layers.3.attn.indexer.wq_b.weight", "model.layers.3.self_attn.indexer.q_b_proj.weight"),
    ("layers.5.ffn.gate.bias", "model.layers.5.mlp.gate.e_score_correction_bias"),
    ("layers.5.ffn.experts.17.w2.weight", "model.layers.5.mlp.experts.17.down_proj.weight"),
    ("layers.5.ffn.shared_experts.w3.scale", "model.layers.5.mlp.shared_experts.up_proj.weight_scale_inv"),
    ("layers.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
    ("layers.1.hc_ffn_scale", "model.layers.1.hc_ffn_scale"),
    ("mtp.0.e_proj.scale", "model.mtp.0.e_proj.weight_scale_inv"),
])
def test_known_names(official, hf):
    assert to_hf(official) == hf
    assert to_official(hf) == official
