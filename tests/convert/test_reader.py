"""Bad checkpoints: each is one ConvertError naming the file/tensor and what was expected; lazy partial reads."""

import json
import os
import struct

import pytest
import torch

from convert.errors import ConvertError
from convert.reader import Checkpoint

SHARD = "model-00002-of-00006.safetensors"   # layer 0


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _set_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_header(file, edit):
    """Rewrite a safetensors header (keeping the data) after `edit(header)`."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _load(path):
    ckpt = Checkpoint(path)
    ckpt.validate()


def test_partial_reads(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    full = ckpt.read("layers.1.attn.wo_b.weight")
    part = ckpt.read("layers.1.attn.wo_b.weight", 1, 128, 256)
    assert part.dtype == torch.float8_e4m3fn and torch.equal(part.view(torch.uint8), full[:, 128:256].view(torch.uint8))


def test_missing_shard(ckpt_copy):
    (ckpt_copy / SHARD).unlink()
    with pytest.raises(ConvertError, match=f"shard {SHARD} does not exist"):
        _load(ckpt_copy)


@pytest.mark.parametrize("entry, message", [
    ("../outside.safetensors", "must be a file name inside"),
    ("/etc/passwd", "must be a file name inside"),
    ("sub/../../x.safetensors", "must be a file name inside"),
    ("model-99999.safetensors", "model-99999.safetensors does not exist"),
    (["model-00002-of-00006.safetensors"], "weight_map' object of tensor name -> file name strings"),
    (7, "weight_map' object of tensor name -> file name strings"),
    (None, "weight_map' object of tensor name -> file name strings"),
])
def test_bad_weight_map_entry(ckpt_copy, entry, message):
    """A weight_map file name outside the checkpoint, missing, or not a string: one ConvertError naming it."""
    index = _index(ckpt_copy)
    index["weight_map"]["embed.weight"] = entry
    _set_index(ckpt_copy, index)
    with pytest.raises(ConvertError, match=message):
        _load(ckpt_copy)


def test_symlink_escape(ckpt_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(ckpt_copy / SHARD, outside)
    os.symlink(outside, ckpt_copy / SHARD)
    with pytest.raises(ConvertError, match="outside the checkpoint directory"):
        _load(ckpt_copy)


def test_truncated_file(ckpt_copy):
    f = ckpt_copy / SHARD
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ConvertError, match=f"{SHARD}: tensor .* outside the .* data section"):
        _load(ckpt_copy)


@pytest.mark.parametrize("garbage, message", [
    (b"\x05", "truncated safetensors file"),
    (struct.pack("<Q", 1 << 40) + b"{}", "corrupt safetensors header"),
    (struct.pack("<Q", 6) + b"{nope}", "not JSON"),
    pytest.param(struct.pack("<Q", 200_000) + b"[" * 200_000, "not JSON.*nested too deeply", id="deep"),
    pytest.param(struct.pack("<Q", 5_010) + b'{"a": ' + b"9" * 5_000 + b"}   ", "not JSON", id="huge-int"),
])
def test_corrupt_header(ckpt_copy, garbage, message):
    (ckpt_copy / SHARD).write_bytes(garbage)
    with pytest.raises(ConvertError, match=message):
        _load(ckpt_copy)


@pytest.mark.parametrize("meta", [{"a": 1}, [1, 2], "text"])
def test_bad_metadata(ckpt_copy, meta):
    """A header whose __metadata__ is not a map of strings (safetensors refuses the file when it opens it, which
    used to happen mid-conversion as a traceback) is refused when the header is read."""
    _edit_header(ckpt_copy / SHARD, lambda h: h.update(__metadata__=meta))
    with pytest.raises(ConvertError, match=f"{SHARD}: corrupt safetensors header .*__metadata__"):
        _load(ckpt_copy)


def test_index_may_spell_one_shard_two_ways(ckpt_copy):
    """`./NAME` and `NAME` are one file: read once, not reported as holding its tensors twice."""
    index = _index(ckpt_copy)
    index["weight_map"]["layers.0.attn.kv_norm.weight"] = "./" + SHARD
    _set_index(ckpt_copy, index)
    _load(ckpt_copy)


def test_index_nested_too_deeply(ckpt_copy):
    (ckpt_copy / "model.safetensors.index.json").write_text("[" * 200_000)
    with pytest.raises(ConvertError, match="expected JSON with a 'weight_map' object"):
        _load(ckpt_copy)


def test_gapped_data(ckpt_copy):
    def shrink(h):  # kv_norm claims no bytes: the next tensor no longer starts where the previous ended
        h["layers.0.attn.kv_norm.weight"]["data_offsets"][1] = h["layers.0.attn.kv_norm.weight"]["data_offsets"][0]
        h["layers.0.attn.kv_norm.weight"]["shape"] = [0]
    _edit_header(ckpt_copy / SHARD, shrink)
    with pytest.raises(ConvertError, match=f"{SHARD}: tensor .* starts at byte .*overlapping or gapped"):
        _load(ckpt_copy)


def test_trailing_bytes(ckpt_copy):
    with open(ckpt_copy / SHARD, "ab") as f:
        f.write(bytes(64))
    with pytest.raises(ConvertError, match=f"{SHARD}: 64 bytes after the last tensor"):
        _load(ckpt_copy)


def test_tensor_missing(ckpt_copy):
    _drop(ckpt_copy / SHARD, "layers.0.ffn.gate.tid2eid")
    index = _index(ckpt_copy)
    index["weight_map"].pop("layers.0.ffn.gate.tid2eid")
    _set_index(ckpt_copy, index)
    with pytest.raises(ConvertError, match="tensor layers.0.ffn.gate.tid2eid is missing"):
        _load(ckpt_copy)


def _drop(file, name):
    """Remove tensor `name` from a safetensors file: its header entry and its bytes, later tensors moved down."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    b, e = header.pop(name)["data_offsets"]
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + data[:b] + data[e:])


def test_shape_disagrees_with_config(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["q_lora_rank"] = 256
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"tensor layers.0.attn.wq_a.weight is F8_E4M3 \[128, 256\], "
                                           r"expected F8_E4M3 \[256, 256\] from config.json"):
        _load(ckpt_copy)


def test_expert_dtype_from_config_not_byte_width(ckpt_copy):
    # same bytes, but config.json says the experts are FP8: I8 [256, 128] is then wrong, not "1 byte, fine"
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["expert_dtype"] = "fp8"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"experts.0.w1.weight is I8 \[256, 128\], expected F8_E4M3 \[256, 256\]"):
        _load(ckpt_copy)


def test_unknown_dtype(ckpt_copy):
    _edit_header(ckpt_copy / SHARD, lambda h: h["layers.0.attn.attn_sink"].update(dtype="F9_X"))
    with pytest.raises(ConvertError, match="tensor layers.0.attn.attn_sink has unknown dtype 'F9_X'"):
        _load(ckpt_copy)
