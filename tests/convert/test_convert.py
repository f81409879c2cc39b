"""Conversion: shards put back together equal the source, formats equal a reference cast, atomic + resumable."""

import errno
import json
import re
import subprocess
import sys

import pytest
import torch

from ascend.cli import main
from convert import load_rank
from convert.errors import ConvertError
from convert.job import Conversion
from convert.reader import Checkpoint
from convert.shard import Sharding
from convert.verify import verify
from model import quant
from model.config import ModelConfig
from tests.convert.conftest import plan_for


def _convert(src, out, tp, ep, redundant=0, weights="keep", **kw):
    ckpt = Checkpoint(src)
    plan = plan_for(ckpt.config, tp, ep, redundant)
    Conversion(ckpt, Sharding.from_plan(plan, ckpt.config), weights).run(out, plan.to_dict(), progress=False, **kw)
    return plan


def _bytes(t):
    return t.contiguous().view(torch.uint8)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# The official converter's split rule, written out independently of convert/layout.py.
_DIM0 = re.compile(r"(embed|head)\.weight|.*\.attn\.(wq_b|indexer\.wq_b|wo_a)\.(weight|scale)"
                   r"|.*\.attn\.attn_sink|.*\.attn\.indexer\.weights_proj\.weight")
_DIM1 = re.compile(r".*\.attn\.wo_b\.(weight|scale)")


def test_tp2_shards_reassemble_to_source(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    _convert(tiny_ckpt, out, tp=2, ep=1)
    src = Checkpoint(tiny_ckpt)
    ranks = [load_rank(out, r) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) == set(src.tensors)
    n_split = 0
    for name in src.tensors:
        dim = 0 if _DIM0.fullmatch(name) else 1 if _DIM1.fullmatch(name) else None
        if dim is None:
            for r in ranks:
                assert torch.equal(_bytes(r[name]), _bytes(src.read(name))), name  # replicated
        else:
            n_split += 1
            assert ranks[0][name].shape[dim] * 2 == src.tensors[name].shape[dim], name
            whole = torch.cat([_bytes(r[name]) for r in ranks], dim=dim)
            assert torch.equal(whole, _bytes(src.read(name))), name
    assert n_split == 2 + 5 * 7 + 2 * 3   # embed, head; per block 7 attention tensors; 3 indexer ones per CSA layer
    verify(out, against=tiny_ckpt)


def test_ep2_with_redundant_replicas(tiny_ckpt, tiny_cfg, tmp_path):
    out = tmp_path / "out"
    plan = _convert(tiny_ckpt, out, tp=1, ep=2, redundant=2)
    src = Checkpoint(tiny_ckpt)
    manifest = json.loads((out / "manifest.json").read_text())
    for layer in range(tiny_cfg.n_layers + tiny_cfg.n_mtp_layers):
        prefix = f"layers.{layer}" if layer < tiny_cfg.n_layers else f"mtp.{layer - tiny_cfg.n_layers}"
        holders = {}
        for rank in range(2):
            sd = load_rank(out, rank)
            held = {int(n.split(".")[-3]) for n in sd if n.startswith(f"{prefix}.ffn.experts.")}
            assert held == set(plan.experts_on_rank(layer, rank))
            assert manifest["ranks"][rank]["slots"][layer] == plan.experts_on_rank(layer, rank)
            for e in held:
                holders.setdefault(e, []).append(rank)
                for w in ("w1.weight", "w1.scale", "w2.weight", "w3.scale"):
                    name = f"{prefix}.ffn.experts.{e}.{w}"
                    assert torch.equal(_bytes(sd[name]), _bytes(src.read(name)))
            assert torch.equal(sd[f"{prefix}.ffn.shared_experts.w2.weight"].view(torch.uint8),
                               src.read(f"{prefix}.ffn.shared_experts.w2.weight").view(torch.uint8))
        assert set(holders) == set(range(tiny_cfg.n_routed_experts))
        assert sum(len(v) for v in holders.values()) == tiny_cfg.n_routed_experts + 2   # replicas on 2 ranks


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_formats_equal_reference_dequantisation(tiny_ckpt, tmp_path, weights):
    out = tmp_path / "out"
    _convert(tiny_ckpt, out, tp=2, ep=2, weights=weights)
    src = Checkpoint(tiny_ckpt)
    cfg = ModelConfig.from_hf(out)
    assert (cfg.dtype, cfg.expert_dtype) == (weights, weights)
    r1 = load_rank(out, 1)
    # reference: dequantise the WHOLE source weight, then take rank 1's slice (the converter slices first)
    cases = [("layers.1.attn.wq_b", quant.dequantize_fp8, (0, 512, 1024)),
             ("layers.1.attn.wo_b", quant.dequantize_fp8, (1, 256, 512)),
             ("layers.3.attn.wkv", quant.dequantize_fp8, None),
             ("layers.2.ffn.experts.5.w2", quant.dequantize_fp4, None)]
    for stem, deq, split in cases:
        full = deq(src.read(f"{stem}.weight"), src.read(f"{stem}.scale"))
        part = full if split is None else full.narrow(split[0], split[1], split[2] - split[1])
        if weights == "bf16":
            assert f"{stem}.scale" not in r1
            assert torch.equal(r1[f"{stem}.weight"], part.to(torch.bfloat16)), stem
        else:
            q = torch.round(part / (part.abs().amax(1, keepdim=True) / 127)).to(torch.int8)
            assert r1[f"{stem}.weight"].dtype == torch.int8 and r1[f"{stem}.scale"].dtype == torch.float32
            assert torch.equal(r1[f"{stem}.weight"], q), stem
            assert torch.allclose(r1[f"{stem}.scale"], part.abs().amax(1) / 127)
    assert torch.equal(r1["layers.1.attn.compressor.wkv.weight"], src.read("layers.1.attn.compressor.wkv.weight"))
    verify(out, against=tiny_ckpt)


def test_cli_dry_run_writes_nothing(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "never"
    main(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "2", "--ep", "2", "--dry-run", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert not out.exists()
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    r0 = {n: s for n, _, s in report["ranks"][0]["tensor_list"]}
    assert r0["embed.weight"] == [512, 256]
    main(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "2", "--ep", "2", "--json"])
    capsys.readouterr()
    for r in report["ranks"]:           # what it said it would write: the files' sizes, headers included
        assert r["bytes"] == sum(f.stat().st_size for f in (out / f"rank-{r['rank']:05d}").glob("*.safetensors"))
    err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "2", "--ep", "2", "--dry-run"],
                     capsys)
    assert "output directory is not empty" in err            # as the real run would say
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for dry in (["--dry-run"], []):                          # an --out that is a file: both refuse it alike
        err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(afile), "--tp", "2", "--ep", "2", *dry],
                         capsys)
        assert err.endswith(f"{afile}: exists and is not a directory") and afile.read_text() == "x"


def test_cli_convert_verify_and_load(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    main(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "2", "--ep", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["world_size"] == 2
    main(["verify", str(out), "--against", str(tiny_ckpt), "--json"])
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert sorted(p.name for p in out.iterdir()) == [".convert.lock", "config.json", "manifest.json", "plan.json",
                                                    "rank-00000", "rank-00001", "tokenizer.json",
                                                    "tokenizer_config.json"]


def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # (progress bars share stderr)
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_verify_detects_damage(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    _convert(tiny_ckpt, out, tp=1, ep=2)
    manifest = (out / "manifest.json").read_text()
    broken = json.loads(manifest)
    del broken["ranks"][0]["tensors"]["layers.2.attn.wo_a.scale"]
    (out / "manifest.json").write_text(json.dumps(broken))
    assert "rank 0 lacks tensor layers.2.attn.wo_a.scale that the plan puts there" in _cli_error(
        ["verify", str(out)], capsys)
    fileless = json.loads(manifest)       # rank 0's files dropped from the manifest (and from disk)
    fileless["ranks"][0]["files"] = {}
    (out / "manifest.json").write_text(json.dumps(fileless))
    assert "rank 0 tensor embed.weight is in none of the rank's files" in _cli_error(["verify", str(out)], capsys)
    for cut in ("config", "world_size"):
        short = json.loads(manifest)
        del short[cut]
        (out / "manifest.json").write_text(json.dumps(short))
        assert f"manifest.json: the manifest needs '{cut}' as a JSON" in _cli_error(["verify", str(out)], capsys)
    short = json.loads(manifest)
    del next(iter(short["ranks"][1]["files"].values()))["sha256"]
    (out / "manifest.json").write_text(json.dumps(short))
    assert "manifest.json: ranks[1] file rank-00001/" in _cli_error(["verify", str(out)], capsys)
    (out / "manifest.json").write_text(manifest)
    victim = out / "rank-00001" / "model-00003-of-00006.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "rank-00001/model-00003-of-00006.safetensors: sha256/size differ" in _cli_error(["verify", str(out)], capsys)
    (out / "manifest.json").unlink()
    assert "incomplete" in _cli_error(["verify", str(out)], capsys)
    assert f"{tmp_path / 'nope'}: no such directory" in _cli_error(["verify", str(tmp_path / "nope")], capsys)


def test_verify_checks_what_the_launcher_checks(tiny_ckpt, tmp_path, capsys):
    """A plan.json that differs from the plan the shards follow (the launcher refuses it), a copied tokenizer file
    that changed, and manifest entries edited by hand are each one error, not 'ok' or a traceback."""
    out = tmp_path / "out"
    _convert(tiny_ckpt, out, tp=1, ep=2)
    copied = json.loads((out / "manifest.json").read_text())["copied"]
    assert copied.keys() == {"tokenizer.json", "tokenizer_config.json"}
    plan = (out / "plan.json").read_text()
    swapped = json.loads(plan)
    layer = swapped["experts"]["layers"][0]                                   # experts 0 and 1 trade slots (rank 0)
    layer["phy2log"][:2], layer["log2phy"][:2] = [1, 0], [[1], [0]]
    (out / "plan.json").write_text(json.dumps(swapped))
    assert "plan.json: differs from the plan the shards were converted with" in _cli_error(["verify", str(out)], capsys)
    (out / "plan.json").write_text(plan)
    tokenizer = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_bytes(tokenizer + b" ")
    assert "tokenizer.json: sha256 differs from the manifest" in _cli_error(["verify", str(out)], capsys)
    (out / "tokenizer.json").write_bytes(tokenizer)
    manifest = (out / "manifest.json").read_text()
    for field, value, message in (("split", "x", "needs 'split' as null or [dim, begin, end]"),
                                  ("split", [9, 0, 1], "split [9, 0, 1] does not fit source tensor embed.weight"),
                                  ("source", "nope", "names source tensor 'nope', which the model does not have")):
        edited = json.loads(manifest)
        edited["ranks"][0]["tensors"]["embed.weight"][field] = value
        (out / "manifest.json").write_text(json.dumps(edited))
        assert message in _cli_error(["verify", str(out), "--against", str(tiny_ckpt)], capsys)
    for value in (None, [], {"tokenizer.json": 5}):
        edited = json.loads(manifest)
        edited["copied"] = value
        (out / "manifest.json").write_text(json.dumps(edited))
        assert "needs 'copied' as a JSON object" in _cli_error(["verify", str(out)], capsys)


def test_source_files_outside_or_replaced_are_refused(ckpt_copy, tmp_path):
    """A tokenizer file that links out of the checkpoint is refused before any shard is written (it was copied
    into the output); a resume whose source shards were replaced since (same sizes, newer files) is another job."""
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (ckpt_copy / "tokenizer_config.json").unlink()
    (ckpt_copy / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(ConvertError, match="file tokenizer_config.json resolves to .*outside the checkpoint"):
        _convert(ckpt_copy, tmp_path / "out", tp=1, ep=1)
    assert not (tmp_path / "out").exists()
    (ckpt_copy / "tokenizer_config.json").unlink()
    ckpt = Checkpoint(ckpt_copy)
    plan = plan_for(ckpt.config, 1, 1)
    out = tmp_path / "resumed"
    (out / "rank-00000").mkdir(parents=True)          # an interrupted run of this job
    (out / ".convert-job.json").write_text(json.dumps(
        Conversion(ckpt, Sharding.from_plan(plan, ckpt.config), "keep").identity(plan.to_dict())))
    job = json.loads((out / ".convert-job.json").read_text())
    shard = ckpt.files[0]
    shard.touch()                                     # replaced by a file of the same size
    with pytest.raises(ConvertError, match="--resume of a different job \\(source_mtime_ns differs"):
        _convert(ckpt_copy, out, tp=1, ep=1, resume=True)
    (out / ".convert-job.json").write_text(json.dumps({**job, "schema": 1}))
    with pytest.raises(ConvertError, match="written by another version of ascend-deploy \\(job schema 1"):
        _convert(ckpt_copy, out, tp=1, ep=1, resume=True)


def test_second_convert_into_the_same_directory_is_refused(tiny_ckpt, tmp_path):
    """While one conversion holds the output directory's lock, another into it stops at once, touching nothing."""
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".convert.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConvertError, match="another ascend convert is writing here"):
            _convert(tiny_ckpt, out, tp=1, ep=1)
    assert sorted(p.name for p in out.iterdir()) == [".convert.lock"]
    _convert(tiny_ckpt, out, tp=1, ep=1)              # the holder gone, it runs
    assert verify(out)["ok"]


def test_file_system_without_locks_converts_with_a_warning(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    _convert(tiny_ckpt, tmp_path / "out", tp=1, ep=1)
    assert "no file locks on this file system" in capsys.readouterr().err and verify(tmp_path / "out")["ok"]


def test_verify_against_other_source(tiny_ckpt, tmp_path, capsys):
    from convert.synth import write_synthetic
    other = tmp_path / "other"
    write_synthetic(other, ModelConfig.preset("tiny"), seed=2)
    out = tmp_path / "out"
    _convert(tiny_ckpt, out, tp=2, ep=1)
    err = _cli_error(["verify", str(out), "--against", str(other)], capsys)
    assert "tensor embed.weight differs from source embed.weight slice [0, 0, 512] after the keep cast" in err
    write_synthetic(tmp_path / "smaller", ModelConfig.preset("tiny", n_layers=2), seed=0)
    err = _cli_error(["verify", str(out), "--against", str(tmp_path / "smaller")], capsys)
    assert f"smaller/config.json: describes another model than the source {out} was converted from" in err


def test_plan_disagreeing_with_checkpoint(tiny_ckpt, tmp_path, capsys):
    other = ModelConfig.preset("tiny", n_routed_experts=16)
    plan_for(other, 1, 2).save(tmp_path / "plan.json")
    err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--plan",
                      str(tmp_path / "plan.json")], capsys)
    assert "plan is for n_routed_experts = 16, the checkpoint has 8" in err
    plan_for(ModelConfig.preset("tiny", n_layers=2), 1, 2).save(tmp_path / "plan2.json")
    err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--plan",
                      str(tmp_path / "plan2.json")], capsys)
    assert "plan is for n_layers = 2, the checkpoint has 4" in err
    assert not (tmp_path / "o").exists()


def test_tp_not_dividing_the_checkpoint(tiny_ckpt, tiny_cfg):
    class Wide:  # a plan object from elsewhere whose tp cannot split this checkpoint (4 output groups)
        world_size, tp, n_routed_experts, n_layers, n_mtp_layers = 16, 16, 8, 4, 1
        def experts_on_rank(self, layer, rank):
            return [rank % 8]
    with pytest.raises(ConvertError, match="plan.json: tp=16 must divide o_groups=4 of the checkpoint"):
        Sharding.from_plan(Wide(), tiny_cfg, "plan.json")


def test_output_dir_not_empty(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "1", "--ep", "1"], capsys)
    assert "output directory is not empty (holds notes.txt)" in err
    err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "1", "--ep", "1", "--resume"], capsys)
    assert "not an interrupted conversion" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_disk_full(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import convert.writer as writer
    real = writer.SafetensorsWriter._write
    calls = {"n": 0}

    def full(self, data):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(writer.SafetensorsWriter, "_write", full)
    out = tmp_path / "out"
    err = _cli_error(["convert", "--hf", str(tiny_ckpt), "--out", str(out), "--tp", "2", "--ep", "2"], capsys)
    assert "no space left on device" in err and ".safetensors" in err
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.partial"))
    with pytest.raises(ConvertError, match="incomplete"):
        verify(out)


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, tmp_path_factory):
    """The files of an uninterrupted tp2/ep2/redundant-2 conversion."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _convert(tiny_ckpt, out, tp=2, ep=2, redundant=2)
    return _files(out)


# `ascend <args>` in a process that SIGKILLs itself once argv[1] tensors have been written in all.
_KILL_AFTER_N_TENSORS = """
import os, signal, sys
from ascend.cli import main
from convert.writer import SafetensorsWriter
limit, written, done = int(sys.argv[1]), [0], SafetensorsWriter._done
def _done(self, *args):
    done(self, *args)
    written[0] += 1
    if written[0] >= limit:
        os.kill(os.getpid(), signal.SIGKILL)
SafetensorsWriter._done = _done
main(sys.argv[2:])
"""


@pytest.mark.parametrize("kill_after", [3, 290])   # inside the first shard's files; in a later shard
def test_kill_and_resume_is_byte_identical(tiny_ckpt, tmp_path, kill_after, uninterrupted):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _KILL_AFTER_N_TENSORS, str(kill_after), "convert", "--hf", str(tiny_ckpt),
           "--out", str(out), "--tp", "2", "--ep", "2", "--redundant", "2", "--json"]
    killed = subprocess.run(cmd, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-400:]
    assert not (out / "manifest.json").exists()
    assert list(out.rglob("*.partial"))                      # it died in the middle of a file
    with pytest.raises(ConvertError, match="incomplete"):
        verify(out)
    with pytest.raises(ConvertError, match="not empty"):
        _convert(tiny_ckpt, out, tp=2, ep=2, redundant=2)
    with pytest.raises(ConvertError, match="--resume of a different job \\(weights differs"):
        _convert(tiny_ckpt, out, tp=2, ep=2, redundant=2, weights="bf16", resume=True)
    job = (out / ".convert-job.json").read_text()
    for odd, match in (({**json.loads(job), "extra": 1}, "different job \\(extra differs"), ([1], "a JSON object")):
        (out / ".convert-job.json").write_text(json.dumps(odd))
        with pytest.raises(ConvertError, match=match):
            _convert(tiny_ckpt, out, tp=2, ep=2, redundant=2, resume=True)
    (out / ".convert-job.json").write_text(job)
    finished = sorted(out.glob("rank-*/*.safetensors"))
    assert finished or kill_after < 10            # killed in a later shard: the first shard's files are done
    if finished:      # kept by --resume only if still as written: one cut short, one with another header
        with open(finished[0], "r+b") as f:
            f.truncate(finished[0].stat().st_size - 8)
        if len(finished) > 1:
            with open(finished[-1], "r+b") as f:
                f.seek(9)
                f.write(b"X")
    _convert(tiny_ckpt, out, tp=2, ep=2, redundant=2, resume=True)
    assert _files(out) == uninterrupted
    verify(out, against=tiny_ckpt)


def test_every_file_rename_is_followed_by_a_directory_sync(tiny_ckpt, tmp_path, monkeypatch):
    """Each shard, index and the manifest: fsynced, renamed, then its directory fsynced (a crash can otherwise
    keep a later rename, the manifest's, and lose an earlier one, a shard's)."""
    import os
    import stat
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _convert(tiny_ckpt, tmp_path / "out", 1, 2)
    renames = [i for i, e in enumerate(events) if e == "rename"]
    assert len(renames) >= 4 and all(events[i - 1] == "file" and events[i + 1] == "dir" for i in renames)


def test_byte_range_copy_gives_the_same_files_as_tensors(tiny_ckpt, tmp_path, monkeypatch):
    """Tensors written as stored are copied as byte ranges of the source (4 KiB chunks here, so most take
    several); the same conversion made entirely through tensors read with safetensors gives the same bytes."""
    import convert.job as job
    from convert.writer import CopyBuffers
    monkeypatch.setattr(CopyBuffers, "CHUNK", 4096)
    _convert(tiny_ckpt, tmp_path / "ranges", tp=2, ep=2)
    monkeypatch.setattr(job.Conversion, "_ranges", lambda *a: pytest.fail("byte-range copy used"))
    monkeypatch.setattr(job, "_fmt", lambda spec: object())   # no format equals another: every unit is a tensor
    monkeypatch.setattr(job, "cast_linear", lambda w, s, src, dst: (w, s))
    _convert(tiny_ckpt, tmp_path / "tensors", tp=2, ep=2, workers=1)
    assert _files(tmp_path / "ranges") != {} and _files(tmp_path / "ranges") == _files(tmp_path / "tensors")


def test_hf_named_checkpoint_converts_to_the_same_shards(tmp_path):
    from convert.synth import write_synthetic
    cfg = ModelConfig.preset("tiny", n_layers=2)
    write_synthetic(tmp_path / "official", cfg, seed=5)
    write_synthetic(tmp_path / "hf", cfg, seed=5, hf_names=True)
    for name in ("official", "hf"):
        _convert(tmp_path / name, tmp_path / f"out-{name}", tp=2, ep=2)
    a, b = _files(tmp_path / "out-official"), _files(tmp_path / "out-hf")
    ranks = [k for k in a if k.startswith("rank-")]
    assert ranks and {k: a[k] for k in ranks} == {k: b[k] for k in ranks}   # official names, same bytes
    verify(tmp_path / "out-hf", against=tmp_path / "hf")
