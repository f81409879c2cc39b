"""`ascend convert` and `ascend verify`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from ascend.cli import json_option
from convert.errors import ConvertError
from convert.formats import FORMATS


def _plan(plan_path, tp, ep, redundant, cfg):
    """The plan to follow: --plan FILE, or one made here from --tp / --ep (world = lcm(tp, ep))."""
    from ascend.planner.plan import Plan, make_plan
    if plan_path is not None:
        if tp or ep or redundant:
            raise ConvertError("--plan: give either --plan or --tp/--ep/--redundant, not both")
        return Plan.load(plan_path), str(plan_path)
    if not tp or not ep:
        raise ConvertError("--tp/--ep: give --plan PLAN.json, or both --tp N and --ep M")
    return make_plan(cfg, math.lcm(tp, ep), tp, ep, redundant=redundant), f"--tp {tp} --ep {ep}"


@click.command("convert")
@click.option("--hf", "hf", required=True, type=click.Path(),
              help="Checkpoint directory (index + shards + config.json).")
@click.option("--out", "out", required=True, type=click.Path(), help="New or empty output directory.")
@click.option("--plan", "plan_path", type=click.Path(), default=None, help="plan.json from `ascend plan`.")
@click.option("--tp", type=int, default=None, help="Tensor-parallel degree (without --plan).")
@click.option("--ep", type=int, default=None, help="Expert-parallel degree (without --plan).")
@click.option("--redundant", type=int, default=0, show_default=True, help="Redundant expert slots (without --plan).")
@click.option("--weights", type=click.Choice(FORMATS), default="keep", show_default=True,
              help="keep: FP8/FP4 as published; bf16: dequantised; int8: per-channel W8 + float32 scale.")
@click.option("--dry-run", is_flag=True, help="Print what each rank would get; write nothing.")
@click.option("--resume", is_flag=True, help="Finish an interrupted conversion into the same --out.")
@click.option("--workers", type=int, default=2, show_default=True, help="Reader/cast threads.")
@json_option
def convert_command(hf, out, plan_path, tp, ep, redundant, weights, dry_run, resume, workers, as_json):
    """Convert and shard a checkpoint for a plan: one directory of safetensors files per rank."""
    from convert.job import Conversion
    from convert.reader import Checkpoint
    from convert.shard import Sharding

    ckpt = Checkpoint(hf)
    plan, origin = _plan(plan_path, tp, ep, redundant, ckpt.config)
    conv = Conversion(ckpt, Sharding.from_plan(plan, ckpt.config, origin), weights)
    if dry_run:
        conv.check_out(Path(out), plan.to_dict(), resume)        # the real run would stop there
        ranks = conv.summary()
        if as_json:
            click.echo(json.dumps({"dry_run": True, "weights": weights, "ranks": ranks}, indent=1))
            return
        for r in ranks:
            click.echo(f"rank {r['rank']}: {r['files']} files, {r['tensors']} tensors, {r['bytes'] / 2**20:.1f} MiB")
            for name, dtype, shape in r["tensor_list"]:
                click.echo(f"  {name} {dtype} {shape}")
        return
    manifest = conv.run(Path(out), plan.to_dict(), resume=resume, workers=workers, progress=not as_json)
    summary = {"out": str(out), "weights": weights, "world_size": manifest["world_size"],
               "files": sum(len(r["files"]) for r in manifest["ranks"]),
               "bytes": sum(f["bytes"] for r in manifest["ranks"] for f in r["files"].values())}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(f"wrote {summary['files']} files ({summary['bytes'] / 2**30:.2f} GiB) for "
                   f"{summary['world_size']} ranks to {out}")


@click.command("verify")
@click.argument("out", type=click.Path())
@click.option("--against", type=click.Path(), default=None, help="Source checkpoint to compare every tensor with.")
@json_option
def verify_command(out, against, as_json):
    """Check converted shards: manifest, completeness against the plan, hashes, and optionally the source."""
    from convert.verify import verify
    summary = verify(out, against=against, progress=not as_json)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        extra = f", every tensor equal to {against} after the {summary['weights']} cast" if against else ""
        click.echo(f"ok: {summary['world_size']} ranks, {summary['files']} files, {summary['tensors']} tensors "
                   f"intact{extra}")
