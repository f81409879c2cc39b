"""`ascend run`: start the inference job under torchrun, one process per device.

The command checks what it can before any process starts (the converted checkpoint exists and was
sharded for exactly nnodes x nproc ranks), then runs

    python -m torch.distributed.run --nproc-per-node N [--standalone | --nnodes --node-rank
        --master-addr --master-port] -m ascend.serve --ckpt DIR [launch options]

and exits with torchrun's status. Options it does not know (--input, --max-new-tokens, ...) go to
ascend.serve unchanged; `python3 -m ascend.serve --help` lists them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click

from ascend.cli import device_option, json_option
from ascend.errors import AscendDeployError, parse_json

ENTRY = "ascend.serve"     # the module every rank runs (torchrun -m): part of the package, so installs have it


class RunError(AscendDeployError):
    """`ascend run` options that cannot start a job (missing checkpoint, wrong rank count)."""


def converted_manifest(ckpt: Path) -> dict:
    """A converted checkpoint's manifest.json, with the world size it was sharded for as an int."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        raise RunError(f"{manifest}: not found; --ckpt must be the output directory of `ascend convert`")
    try:
        m = parse_json(manifest.read_text())
        return {**m, "world_size": int(m["world_size"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e})") from None


def check_act_quant(ckpt: Path, manifest: dict) -> None:
    """--act-quant needs the model's projection widths in whole FP8 blocks of 128 (`ModelConfig.validate`): refuse
    it here, before torchrun, rather than on every rank."""
    from model.config import ConfigError, ModelConfig
    try:
        ModelConfig.from_hf(manifest.get("config") or {}, act_quant=True)
    except ConfigError as e:
        raise RunError(f"{ckpt / 'manifest.json'}: --act-quant: {str(e).removeprefix('config: ')}") from None


def torchrun_command(ckpt: str | Path, nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None,
                     launch_args: tuple[str, ...] = ()) -> list[str]:
    """The torchrun command line for this job (single node: a standalone rendezvous on a free port)."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise RunError(f"--nproc {nproc} --nnodes {nnodes} --node-rank {node_rank}: expected nproc >= 1, "
                       f"nnodes >= 1 and 0 <= node-rank < nnodes")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
           "--max-restarts=0", "--monitor-interval=0.5"]
    if nnodes == 1 and master_addr is None and master_port is None:
        cmd.append("--standalone")
    else:
        if nnodes > 1 and master_addr is None:
            raise RunError(f"--nnodes {nnodes}: --master-addr (the address of node 0) is required")
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr or '127.0.0.1'}",
                f"--master-port={master_port or 29500}"]
    return cmd + ["-m", ENTRY, "--ckpt", str(ckpt), *launch_args]


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--ckpt", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Converted checkpoint directory (output of `ascend convert`).")
@click.option("--nproc", required=True, type=int, help="Processes (devices) on this node.")
@click.option("--nnodes", default=1, show_default=True, type=int, help="Nodes in the job.")
@click.option("--node-rank", default=0, show_default=True, type=int, help="This node's index.")
@click.option("--master-addr", default=None, help="Address of node 0 (multi-node).")
@click.option("--master-port", default=None, type=int, help="Rendezvous port on node 0 (default 29500).")
@click.option("--dry-run", is_flag=True, help="Print the torchrun command and exit.")
@device_option
@json_option
@click.pass_context
def run_command(ctx: click.Context, ckpt: Path, nproc: int, nnodes: int, node_rank: int, master_addr: str | None,
                master_port: int | None, dry_run: bool, device: str, as_json: bool) -> None:
    """Launch multi-device inference on a converted checkpoint.

    Options not listed here go to ascend.serve (`python3 -m ascend.serve --help`): --input, --prompt,
    --interactive, --max-new-tokens, --temperature, --stop, --json, ...
    """
    manifest = converted_manifest(ckpt)
    world = manifest["world_size"]
    if world != nproc * nnodes:
        raise RunError(f"{ckpt}: converted for {world} ranks, but --nnodes {nnodes} x --nproc {nproc} = "
                       f"{nproc * nnodes}; re-plan and convert, or launch {world} processes")
    launch_args = ("--device", device, *(("--json",) if as_json else ()), *ctx.args)
    from ascend.launch import read_requests
    from ascend.serve import parse_args
    # a bad option (or, on node 0, which reads it, a bad request file) fails here with exit 2, before any rank starts
    served = parse_args(["--ckpt", str(ckpt), *launch_args], prog="ascend run ... (launch options)")
    if served.input and node_rank == 0:
        from ascend.launch import check_lengths
        from model.tokenizer import load_tokenizer
        check_lengths(read_requests(served.input, served.mode), load_tokenizer(served.tokenizer or ckpt),
                      served.max_new_tokens, served.max_len, str(served.input))
    if served.act_quant:
        check_act_quant(ckpt, manifest)
    cmd = torchrun_command(ckpt, nproc, nnodes, node_rank, master_addr, master_port, launch_args)
    if dry_run:
        click.echo(json.dumps({"command": cmd}) if as_json else shlex.join(cmd))
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    status = subprocess.call(cmd, env=env)
    if status:
        click.echo(f"error: the inference job failed (torchrun exit status {status}); the failing rank's "
                   f"`rank N:` message is above", err=True)
    sys.exit(status)  # not ctx.exit: the CLI runs click with standalone_mode=False, which swallows it
