"""`ascend synth`: the published layout exactly, deterministic per seed, sensible quantised values."""

import hashlib
import json

import torch
from safetensors import safe_open

from ascend.cli import main
from convert.layout import expected_tensors
from convert.reader import Checkpoint
from convert.synth import write_synthetic
from model import quant
from model.config import ModelConfig
from model.tokenizer import load_tokenizer


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_layout_config_and_tokenizer(tiny_ckpt, tiny_cfg):
    ckpt = Checkpoint(tiny_ckpt)
    assert ckpt.validate() == expected_tensors(tiny_cfg)          # every name, dtype and shape
    assert len(ckpt.files) == 1 + tiny_cfg.n_layers + tiny_cfg.n_mtp_layers  # several shards
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected_tensors(tiny_cfg))
    assert ModelConfig.from_hf(tiny_ckpt) == tiny_cfg
    assert json.loads((tiny_ckpt / "config.json").read_text()) == tiny_cfg.to_hf_dict()
    dtypes = {t.dtype for t in ckpt.tensors.values()}
    assert dtypes == {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"}
    assert any(n.startswith("mtp.0.") for n in ckpt.tensors)
    tok = load_tokenizer(tiny_ckpt)
    assert tok.token_id("<｜begin▁of▁sentence｜>") == 0


def test_values_are_sensible(tiny_ckpt, tiny_cfg):
    ckpt = Checkpoint(tiny_ckpt)
    tid2eid = ckpt.read("layers.0.ffn.gate.tid2eid")
    assert tid2eid.dtype == torch.int64 and tid2eid.shape == (tiny_cfg.vocab_size, tiny_cfg.n_activated_experts)
    assert 0 <= tid2eid.min() and tid2eid.max() < tiny_cfg.n_routed_experts
    assert all(len(set(row)) == len(row) for row in tid2eid.tolist())  # distinct experts per token
    w = quant.dequantize_fp8(ckpt.read("layers.1.attn.wq_b.weight"), ckpt.read("layers.1.attn.wq_b.scale"))
    assert torch.isfinite(w).all() and 0.5 < w.std() * tiny_cfg.q_lora_rank ** 0.5 < 2
    e = quant.dequantize_fp4(ckpt.read("layers.1.ffn.experts.3.w2.weight"), ckpt.read("layers.1.ffn.experts.3.w2.scale"))
    assert e.shape == (tiny_cfg.dim, tiny_cfg.moe_inter_dim) and 0.5 < e.std() * tiny_cfg.moe_inter_dim ** 0.5 < 2
    norm = ckpt.read("layers.2.attn_norm.weight").float()
    assert (norm - 1).abs().max() < 0.5


def test_deterministic_per_seed_and_hf_names(tmp_path, tiny_ckpt):
    cfg = ModelConfig.preset("tiny", n_layers=2)
    write_synthetic(tmp_path / "a", cfg, seed=3)
    write_synthetic(tmp_path / "b", cfg, seed=3)
    write_synthetic(tmp_path / "c", cfg, seed=4)
    write_synthetic(tmp_path / "h", cfg, seed=3, hf_names=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    official, hf = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "h")
    hf.validate()
    assert any(t.key.startswith("model.layers.0.self_attn") for t in hf.tensors.values())
    for name in ("layers.1.attn.wq_b.scale", "head.weight", "layers.0.ffn.experts.2.w1.weight"):
        assert torch.equal(official.read(name).view(torch.uint8), hf.read(name).view(torch.uint8))


def test_cli(tmp_path, capsys):
    main(["synth", "--preset", "tiny", "--layers", "2", "--experts", "4", "--seed", "7", "--out",
          str(tmp_path / "s"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 4 and summary["seed"] == 7
    cfg = ModelConfig.from_hf(tmp_path / "s")
    assert (cfg.n_layers, cfg.n_routed_experts) == (2, 4)
    with safe_open(str(tmp_path / "s" / "model-00002-of-00004.safetensors"), "pt") as f:
        assert "layers.0.ffn.experts.3.w1.weight" in f.keys()


def test_dry_run_counts_the_published_checkpoint_and_writes_nothing(tmp_path, capsys):
    """deepseek-v4.md §1: V4-Flash on disk is 69,187 tensors, 159.6 GB."""
    main(["synth", "--preset", "flash", "--out", str(tmp_path / "f"), "--dry-run", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 69187 and round(summary["bytes"] / 1e9, 1) == 159.6
    assert not (tmp_path / "f").exists()
