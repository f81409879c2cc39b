"""KV cache: byte accounting against deepseek-v4.md §3, entry layouts, allocation shapes, reset."""

import pytest
import torch

from model.cache import (KVCache, cache_bytes_per_token, decode_index_entries, decode_main_entries,
                         encode_index_entries, encode_main_entries, index_entry_bytes, main_entry_bytes)
from model.config import ModelConfig
from model.quant import fp4_round_trip, fp8_round_trip


def test_entry_sizes():
    assert main_entry_bytes(512, 64, "fp8") == 584            # 448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad
    assert main_entry_bytes(512, 64, "bf16") == 1024
    assert index_entry_bytes(128, "fp8") == 68                 # 64 packed e2m1 + 4 ue8m0
    assert index_entry_bytes(128, "bf16") == 256


def test_bytes_per_token_flash_and_pro():
    flash = cache_bytes_per_token(ModelConfig.preset("flash"), "fp8")
    pro = cache_bytes_per_token(ModelConfig.preset("pro"), "fp8")
    # Flash: 21 CSA x (584 + 68) / 4 + 20 HCA x 584 / 128; Pro: 30 CSA, 31 HCA
    assert flash["csa"] == 21 * 163 and flash["hca"] == 20 * 584 / 128 and flash["sliding"] == 0
    assert pro["csa"] == 30 * 163 and pro["hca"] == 31 * 584 / 128
    assert abs(flash["total"] / 1000 - 3.5) < 0.05 and abs(pro["total"] / 1000 - 5.0) < 0.05
    assert abs(flash["total"] * 2 ** 20 / 2 ** 30 - 3.4) < 0.05          # ~3.4 GiB at 1M tokens
    assert abs(pro["total"] * 2 ** 20 / 2 ** 30 - 4.9) < 0.05            # ~4.9 GiB at 1M tokens
    assert flash["window_bytes_per_sequence"] == 43 * 128 * 584          # fixed, not per token
    bf16 = cache_bytes_per_token(ModelConfig.preset("pro"), "bf16")
    assert bf16["total"] == 30 * (1024 + 256) / 4 + 31 * 1024 / 128


def test_allocation_matches_accounting():
    cfg = ModelConfig.preset("tiny", n_layers=3, compress_ratios=(0, 4, 128), n_mtp_layers=0)
    per_token = cache_bytes_per_token(cfg, "fp8")
    small, big = (KVCache(cfg, 1, n, torch.bfloat16, layout="fp8").nbytes() for n in (512, 1024))
    assert big - small == 512 * per_token["total"]          # growth is exactly the per-token cost
    fixed = KVCache(cfg, 1, 0, torch.bfloat16, layout="fp8")
    state = sum(s.kv.nbytes + s.score.nbytes for layer in fixed.layers
                for s in (layer.compressor, layer.index_compressor) if s is not None)
    assert state == per_token["state_bytes_per_sequence"]


def test_layer_buffers():
    cfg = ModelConfig.preset("tiny")                          # ratios (0, 4, 128, 4) + 1 MTP layer
    cache = KVCache(cfg, 2, 512, torch.float32)
    assert len(cache.layers) == cfg.n_layers + 1
    window, csa, hca, mtp = cache.layers[0], cache.layers[1], cache.layers[2], cache.layers[-1]
    assert window.kv.shape == (2, 16 + 0 + 1, 128) and window.compressor is None and mtp.ratio == 0
    assert csa.kv.shape == (2, 16 + 128 + 1, 128) and csa.index_kv.shape == (2, 129, 128)
    assert csa.compressor.kv.shape == (2, 8, 256) and csa.index_compressor.kv.shape == (2, 8, 256)
    assert hca.kv.shape == (2, 16 + 4 + 1, 128) and hca.compressor.kv.shape == (2, 128, 128)
    assert hca.index_kv is None and csa.discard_row == 16 + 128
    assert [len(layer.buffers()) for layer in (window, csa, hca)] == [1, 6, 3]      # kv, index_kv, states' kv, score
    assert csa.buffers()[0] is csa.kv and csa.buffers()[1] is csa.index_kv and hca.buffers()[1] is hca.compressor.kv
    assert torch.isinf(csa.compressor.score).all()
    csa.compressor.score[1] = 0.0
    cache.lengths += torch.tensor([3, 5])
    cache.reset(torch.tensor([1]))
    assert cache.lengths.tolist() == [3, 0] and torch.isinf(csa.compressor.score).all()


def test_fp8_entries_lossless_after_simulation():
    x = torch.randn(3, 5, 512) * 4
    sim = torch.cat([fp8_round_trip(x[..., :448], 64), x[..., 448:].bfloat16().float()], -1)
    raw = encode_main_entries(sim, 64)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 5, 584)
    assert torch.equal(decode_main_entries(raw, 512, 64, torch.float32), sim)
    # a block of tiny values still round-trips (the 1e-4 amax floor matches the simulation)
    sim[0, 0, :64] = fp8_round_trip(torch.randn(64) * 1e-7, 64)
    assert torch.equal(decode_main_entries(encode_main_entries(sim, 64), 512, 64, torch.float32), sim)
    keys = fp4_round_trip(torch.randn(2, 7, 128))
    raw = encode_index_entries(keys)
    assert raw.shape == (2, 7, 68)
    assert torch.equal(decode_index_entries(raw, 128, torch.float32), keys)


def test_fp8_layout_write_read():
    cfg = ModelConfig.preset("tiny")
    layer = KVCache(cfg, 2, 64, torch.float32, layout="fp8").layers[1]
    assert layer.kv.dtype == torch.uint8 and layer.kv.shape[-1] == main_entry_bytes(128, 64, "fp8")
    v = torch.randn(2, 3, 128)
    v = torch.cat([fp8_round_trip(v[..., :64], 64), v[..., 64:].bfloat16().float()], -1)
    layer.write_main(torch.tensor([[0, 5, 20], [1, 2, 3]]), v)
    back = layer.main_kv()
    assert torch.equal(back[0, [0, 5, 20]], v[0]) and torch.equal(back[1, [1, 2, 3]], v[1])


def test_row_writes_equal_a_per_row_assignment():
    """write_main / write_index put values[b, i] at row rows[b, i] of sequence b, in both layouts (an index_put_,
    so compiled steps keep it in place)."""
    from model.cache import LayerCache

    config = ModelConfig.preset("tiny")
    for layout in ("bf16", "fp8"):
        cache = LayerCache(config, 1, 3, 64, torch.float32, layout=layout)
        expect_kv, expect_index = cache.kv.clone(), cache.index_kv.clone()
        main, index = torch.randn(3, 5, config.head_dim), torch.randn(3, 5, config.index_head_dim)
        main_rows = torch.stack([torch.randperm(cache.discard_row)[:5] for _ in range(3)])
        index_rows = torch.stack([torch.randperm(cache.n_entries)[:5] for _ in range(3)])
        cache.write_main(main_rows, main)
        cache.write_index(index_rows, index)
        enc_main = encode_main_entries(main, config.rope_head_dim) if layout == "fp8" else main
        enc_index = encode_index_entries(index) if layout == "fp8" else index
        for b in range(3):
            for i in range(5):
                expect_kv[b, main_rows[b, i]] = enc_main[b, i].to(expect_kv.dtype)
                expect_index[b, index_rows[b, i]] = enc_index[b, i].to(expect_index.dtype)
        assert torch.equal(cache.kv, expect_kv) and torch.equal(cache.index_kv, expect_index), layout


@pytest.mark.parametrize("layout", ["bf16", "fp8"])
def test_index_keys_leave_out_the_discard_row(layout):
    """The indexer reads its n_entries keys, not the discard row after them (never visible; at 8K context it made
    2,049 entries): a write sent to the discard row is not among them, a write to an entry is."""
    cfg = ModelConfig.preset("tiny")
    layer = KVCache(cfg, 2, 512, torch.float32, layout=layout).layers[1]
    keys = fp4_round_trip(torch.randn(2, 2, 128))                 # values both layouts hold exactly
    layer.write_index(torch.tensor([[5, layer.n_entries], [layer.n_entries, 0]]), keys)
    got = layer.index_keys()
    assert got.shape == (2, layer.n_entries, 128)
    assert torch.equal(got[0, 5], keys[0, 0]) and torch.equal(got[1, 0], keys[1, 1])
    assert not got[0].eq(keys[0, 1]).all(-1).any() and not got[1].eq(keys[1, 0]).all(-1).any()
