"""ModelConfig: presets match the published configs, every spelling reads back, validation names the field."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ascend.errors import AscendDeployError
from model.config import ConfigError, ModelConfig

# The published config.json of deepseek-ai/DeepSeek-V4-Pro (Hugging Face), kept here so the test needs no download
REF_HF = Path(__file__).parent / "data" / "deepseek-v4-pro-config.json"


def test_presets_round_trip_through_hf_dict():
    for name in ("flash", "pro", "tiny"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_hf(cfg.to_hf_dict()) == cfg


def test_flash_and_pro_schedules():
    flash, pro = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    assert (flash.dim, flash.n_layers, flash.n_heads, flash.n_routed_experts, flash.route_scale) == (
        4096, 43, 64, 256, 1.5)
    assert [flash.compress_ratios.count(r) for r in (0, 4, 128)] == [2, 21, 20]
    assert flash.compress_ratios[:4] == (0, 0, 4, 128) and flash.compress_ratios[-1] == 4
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.o_groups, pro.index_topk) == (7168, 61, 128, 16, 1024)
    assert [pro.compress_ratios.count(r) for r in (0, 4, 128)] == [0, 30, 31]
    assert pro.to_hf_dict()["compress_ratios"][-1] == 0 and len(pro.to_hf_dict()["compress_ratios"]) == 62


def test_official_pro_config_json_is_the_pro_preset():
    with open(REF_HF) as f:
        official = json.load(f)
    ours = ModelConfig.preset("pro").to_hf_dict()
    assert ModelConfig.from_hf(official) == ModelConfig.preset("pro")
    # every key we write has the official value; nothing official but the transformers version is missing
    assert {k: v for k, v in ours.items() if k in official} == {k: official[k] for k in ours if k in official}
    assert set(official) - set(ours) == {"transformers_version"}


def test_file_and_directory_paths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.preset("tiny")
    assert ModelConfig.from_hf(tmp_path / "config.json") == ModelConfig.preset("tiny")
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.from_hf(tmp_path / "missing.json")


@pytest.mark.parametrize("text", ["[" * 100_000, '{"vocab_size": ' + "9" * 5_000 + "}"], ids=["deep", "huge-int"])
def test_unparseable_config_is_one_error(tmp_path, text):
    """JSON nested past the parser's depth, or an integer past Python's 4,300 digits, is a ConfigError naming the
    file (RecursionError / ValueError tracebacks before)."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: cannot read model config"):
        ModelConfig.from_hf(tmp_path)


def test_transformers_spelling():
    tiny = ModelConfig.preset("tiny")
    d = tiny.to_hf_dict()
    del d["compress_ratios"], d["num_hash_layers"], d["rope_scaling"], d["qk_rope_head_dim"]
    d["partial_rotary_factor"] = 0.5                   # 64 of head_dim 128
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    d["layer_types"] = [names[r] for r in tiny.compress_ratios]
    d["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    d["mlp_layer_types"] = ["hash_moe"] + ["moe"] * (tiny.n_layers - 1)
    d["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": 10000.0},
                            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16,
                                         "original_max_position_embeddings": 65536,
                                         "beta_fast": 32, "beta_slow": 1}}
    assert ModelConfig.from_hf(d) == tiny


def test_inference_spelling_and_extra_mtp_zeros():
    tiny = ModelConfig.preset("tiny")
    args = {k: getattr(tiny, k) for k in ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers",
                                          "n_heads", "n_routed_experts", "n_activated_experts", "q_lora_rank",
                                          "head_dim", "o_groups", "o_lora_rank", "window_size", "index_n_heads",
                                          "index_head_dim", "index_topk", "max_seq_len", "route_scale")}
    args.update(compress_ratios=list(tiny.compress_ratios) + [0, 0], dtype="fp8", scale_fmt="ue8m0")
    assert ModelConfig.from_hf(args) == tiny
    args["compress_ratios"][-1] = 4
    with pytest.raises(ConfigError, match="MTP"):
        ModelConfig.from_hf(args)


@pytest.mark.parametrize("drop, named", [(("sliding_window",), "sliding_window"),
                                         (("index_topk", "hidden_size"), "hidden_size, index_topk"),
                                         (("compress_ratios",), "compress_ratios (or layer_types)")])
def test_missing_shape_fields_are_named_not_defaulted(tmp_path, drop, named):
    """A config that leaves out a shape or attention field is refused (V4-Flash's value would be silently wrong)."""
    d = ModelConfig.preset("tiny").to_hf_dict()
    for key in drop:
        del d[key]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: missing {re.escape(named)} \("):
        ModelConfig.from_hf(tmp_path)
    args = {k: v for k, v in dataclasses.asdict(ModelConfig.preset("tiny")).items() if k != "window_size"}
    with pytest.raises(ConfigError, match="^config: missing window_size "):
        ModelConfig.from_hf(args)


def test_invalid_values_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**ModelConfig.preset("tiny").to_hf_dict(), "n_routed_experts": "8"}))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: n_routed_experts = '8', expected a positive"):
        ModelConfig.from_hf(tmp_path)


def test_tiny_keeps_every_structural_feature():
    t = ModelConfig.preset("tiny")
    assert {0, 4, 128} <= set(t.compress_ratios)
    assert t.n_hash_layers >= 1 and t.n_layers - t.n_hash_layers >= 2
    assert t.hc_mult == 4 and t.n_mtp_layers == 1 and t.o_groups >= 2
    assert t.n_heads % 4 == 0 and t.index_n_heads % 4 == 0 and t.o_groups % 2 == 0
    assert t.n_routed_experts // 2 > 1 and 2 <= t.n_activated_experts <= 6 and t.vocab_size % 4 == 0
    for d in (t.dim, t.q_lora_rank, t.head_dim, t.o_lora_rank, t.moe_inter_dim, t.n_heads * t.head_dim,
              t.index_n_heads * t.index_head_dim, t.n_heads * t.head_dim // t.o_groups, t.o_groups * t.o_lora_rank):
        assert d % 128 == 0
    assert t.compress_ratio(t.n_layers) == 0 and t.is_hash_layer(0) and not t.is_hash_layer(1)


def test_reduced_depth_preset_keeps_published_schedule():
    cfg = ModelConfig.preset("flash", n_layers=4)
    assert cfg.compress_ratios == (0, 0, 4, 128) and cfg.n_hash_layers == 3
    with pytest.raises(ConfigError, match="n_layers = 100, expected <= 43"):     # it said "<= 0"
        ModelConfig.preset("flash", n_layers=100)


@pytest.mark.parametrize("change, field", [
    (dict(compress_ratios=(0, 4, 64, 4)), "compress_ratios"),
    (dict(compress_ratios=(0, 4, 128)), "compress_ratios"),
    (dict(n_heads=6), "n_heads"),
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(n_hash_layers=5), "n_hash_layers"),
    (dict(dtype="fp16"), "dtype"),
    (dict(expert_dtype="fp4", moe_inter_dim=272), "moe_inter_dim"),
    (dict(index_head_dim=96), "index_head_dim"),
    (dict(score_func="relu"), "score_func"),
    (dict(dim=0), "dim"),
    (dict(route_scale="2.5"), "route_scale"),
    (dict(act_quant=True, moe_inter_dim=160), "moe_inter_dim"),
])
def test_validation_names_field(change, field):
    with pytest.raises(ConfigError, match=field) as err:
        ModelConfig.preset("tiny", **change)
    assert isinstance(err.value, AscendDeployError) and "expected" in str(err.value)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_hf({**ModelConfig.preset("tiny").to_hf_dict()}, not_a_field=1)


def test_tp_split_problem_names_the_dimension_or_the_scale_blocks():
    """One rule for the planner and the converter: even splits of heads, groups, indexer heads and vocabulary, and
    FP8 projections split on whole 128-row scale blocks."""
    flash = ModelConfig.preset("flash")
    assert flash.tp_split_problem(8) is None
    assert flash.tp_split_problem(16) == "tp=16 must divide o_groups=8"
    tiny = ModelConfig.preset("tiny")                       # 4 groups x 128 wo_a rows, 4 indexer heads x 128
    assert tiny.tp_split_problem(4) is None
    narrow = ModelConfig.preset("tiny", o_lora_rank=64)     # 4 x 64 rows of wo_a: 2 ranks get 128 each, 4 get 64
    assert narrow.tp_split_problem(2) is None
    assert narrow.tp_split_problem(4) == ("tp=4 splits wo_a rows (256) into 64, not a multiple of the 128-wide FP8 "
                                          "scale blocks")
    assert ModelConfig.preset("tiny", o_lora_rank=64, dtype="bf16").tp_split_problem(4) is None
