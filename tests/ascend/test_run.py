"""`ascend run`: the torchrun command it builds, and what it refuses before starting any process."""

import json
import shlex

import pytest

from ascend.cli import main
from ascend.run import RunError, torchrun_command
from model.tokenizer import write_synthetic_tokenizer


def test_single_node_uses_a_standalone_rendezvous():
    cmd = torchrun_command("/ck", 2, launch_args=("--json",))
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd and "--max-restarts=0" in cmd
    assert cmd[-5:] == ["-m", "ascend.serve", "--ckpt", "/ck", "--json"]    # the package module: installs have it


def test_multi_node_flags_are_torchrun_flags():
    cmd = torchrun_command("/ck", 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=6000)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=6000"} <= set(cmd)
    assert "--standalone" not in cmd
    with pytest.raises(RunError, match="--master-addr"):
        torchrun_command("/ck", 8, nnodes=2, node_rank=1)
    with pytest.raises(RunError, match="node-rank"):
        torchrun_command("/ck", 8, nnodes=2, node_rank=2, master_addr="h")


def _ckpt(tmp_path, world):
    """A stand-in converted checkpoint: what `ascend run` reads before torchrun (manifest, tokenizer)."""
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "world_size": world, "ranks": []}))
    write_synthetic_tokenizer(tmp_path, 512)
    return str(tmp_path)


def test_dry_run_prints_the_command_with_forwarded_options(tmp_path, capsys):
    requests = tmp_path / "p.jsonl"
    requests.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    main(["run", "--ckpt", _ckpt(tmp_path, 4), "--nproc", "2", "--nnodes", "2", "--master-addr", "h",
          "--dry-run", "--device", "cpu", "--input", str(requests), "--max-new-tokens", "5"])
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[cmd.index("--ckpt"):] == ["--ckpt", str(tmp_path), "--device", "cpu", "--input", str(requests),
                                         "--max-new-tokens", "5"]


@pytest.mark.parametrize("option, message", [(["--input", "missing.jsonl"], "missing.jsonl: cannot read the request"),
                                             (["--max-new-tokens", "0"], "0: expected a positive integer"),
                                             (["--no-such-option"], "unrecognized arguments")])
def test_bad_launch_options_are_refused_before_any_rank_starts(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as e:
        main(["run", "--ckpt", _ckpt(tmp_path, 2), "--nproc", "2", *option])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_request_file_is_refused_before_any_rank_starts(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text('{"messages": [{"role": "user", "content": 5}]}\n')
    with pytest.raises(SystemExit) as e:
        main(["run", "--ckpt", _ckpt(tmp_path, 2), "--nproc", "2", "--input", str(tmp_path / "r.jsonl")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {tmp_path / 'r.jsonl'}:1: ")


def test_world_mismatch_is_refused_before_launch(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--ckpt", _ckpt(tmp_path, 4), "--nproc", "2", "--dry-run"])
    assert e.value.code == 2
    assert "converted for 4 ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--ckpt", str(tmp_path / "nope"), "--nproc", "2"])
    assert e.value.code == 2 and "ascend convert" in capsys.readouterr().err


def test_only_node_0_reads_the_request_file(tmp_path, capsys):
    """Rank 0 alone reads --input, so another node's launcher does not need the file (multi-node)."""
    main(["run", "--ckpt", _ckpt(tmp_path, 4), "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr",
          "h", "--dry-run", "--input", str(tmp_path / "only-on-node-0.jsonl")])
    assert "--input" in capsys.readouterr().out


def test_act_quant_on_a_model_without_whole_fp8_blocks_is_refused_before_launch(tmp_path, capsys):
    """--act-quant rounds projection inputs in blocks of 128: a checkpoint whose widths are not whole blocks is
    refused by `ascend run` itself (exit 2, one line naming the manifest and the field), not by every rank."""
    from model.config import ModelConfig
    config = ModelConfig.preset("tiny", q_lora_rank=96).to_hf_dict()
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "world_size": 1, "ranks": [], "config": config}))
    main(["run", "--ckpt", str(tmp_path), "--nproc", "1", "--dry-run"])            # without it: fine
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", "--ckpt", str(tmp_path), "--nproc", "1", "--dry-run", "--act-quant"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path / 'manifest.json'}: --act-quant: q_lora_rank")


def test_overlong_request_is_refused_before_launch(tmp_path, capsys):
    """Node 0 measures every request of --input with the checkpoint's tokenizer against --max-len before torchrun
    starts (a late batch's overlong request ended the run and lost the finished ones)."""
    requests = tmp_path / "r.jsonl"
    requests.write_text('"short"\n' + json.dumps("word " * 200) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["run", "--ckpt", _ckpt(tmp_path, 1), "--nproc", "1", "--dry-run", "--input", str(requests),
              "--max-len", "64", "--max-new-tokens", "8"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {requests}: request 2 (1): a prompt of")
