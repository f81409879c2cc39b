"""`ascend plan`: choose a layout and expert placement for a cluster; `ascend plan show plan.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from ascend.cli import json_option
from ascend.planner.errors import PlanError
from ascend.planner.memory import COMPONENTS, KV_LAYOUTS, WEIGHT_MODES, MemorySettings
from ascend.planner.plan import Plan

GiB = 2**30


def _config(preset: str | None, config_dir: str | None) -> tuple[Any, str]:
    from model.config import ModelConfig

    if config_dir and preset:
        raise PlanError(f"--preset {preset} and --config {config_dir}: give one of them")
    if config_dir:
        return ModelConfig.from_hf(config_dir), str(config_dir)
    name = preset or "flash"
    return ModelConfig.preset(name), name


def _expert_load(spec: str | None, config: Any) -> np.ndarray | None:
    """A load file, or `lognormal:SIGMA[:SEED]` for the built-in synthetic generator."""
    from ascend.planner import placement as pl

    if spec is None:
        return None
    L, E = config.n_layers + config.n_mtp_layers, config.n_routed_experts
    if spec.startswith("lognormal:"):
        parts = spec.split(":")
        try:   # sigma beyond ~100 overflows the lognormal draw into inf / NaN weights
            sigma, seed = float(parts[1]), int(parts[2]) if len(parts) > 2 else 0
            ok = len(parts) <= 3 and 0 <= sigma <= 100 and seed >= 0
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise PlanError(f"--expert-load {spec!r}: expected lognormal:SIGMA or lognormal:SIGMA:SEED "
                            f"(0 <= SIGMA <= 100, SEED >= 0)")
        return pl.synthetic_load(L, E, sigma, seed)
    if not Path(spec).is_file():
        raise PlanError(f"--expert-load {spec!r}: no such file; expected a [layers, experts] load (.npy / .json / "
                        f".csv) or lognormal:SIGMA[:SEED]")
    return pl.read_expert_load(spec, config.n_layers, E, config.n_mtp_layers)


def _record_rank_loads(plan: Plan, load: np.ndarray | None) -> None:
    """Store each EP rank's load per MoE layer, before (contiguous split) and after placement, as
    `balance.rank_load` (an optional plan.json key that `--plot-placement` draws; older readers ignore it)."""
    from ascend.planner import placement as pl

    L, E = plan.n_moe_layers, plan.n_routed_experts
    load = np.ones((L, E)) if load is None else np.asarray(load, dtype=np.float64)
    if load.shape[0] < L:                # no MTP statistics: make_plan gives MTP layers the mean load
        load = np.concatenate([load, np.repeat(load.mean(0, keepdims=True), L - load.shape[0], 0)])
    contiguous = pl.contiguous_placement(L, E, plan.n_physical_experts)
    plan.balance["rank_load"] = {"before": pl.rank_loads(load, contiguous, plan.ep).round(3).tolist(),
                                 "after": pl.rank_loads(load, plan.phy2log, plan.ep).round(3).tolist()}


def _fmt(n: float, unit: int) -> str:
    return f"{n / unit:.2f}"


def _memory_lines(plan: Plan) -> list[str]:
    """Bytes per rank by component, and the margin to capacity (none for a plan saved without its memory report)."""
    if not plan.memory:
        return []
    peak = max(sum(r["bytes"].values()) for r in plan.memory)
    unit, uname = (GiB, "GiB") if peak >= GiB else (2**20, "MiB")
    lines = [f"memory per rank ({uname}): " + "  ".join(f"{c:>14s}" for c in COMPONENTS) + "       total"]
    for run in plan.memory:
        a, b = run["ranks"]
        total = sum(run["bytes"].values())
        label = f"rank {a}" if a == b else f"ranks {a}-{b}"
        lines.append(f"  {label:>19s}: " + "  ".join(f"{_fmt(run['bytes'][c], unit):>14s}" for c in COMPONENTS)
                     + f"  {_fmt(total, unit):>10s}")
    if plan.capacity_bytes:
        lines.append(f"capacity {_fmt(plan.capacity_bytes, GiB)} GiB per rank, margin "
                     f"{_fmt(plan.capacity_bytes - peak, GiB)} GiB")
    return lines


def _summary(plan: Plan) -> list[str]:
    st = plan.settings
    lines = [f"{plan.model} on {plan.world_size} x {plan.hardware or 'devices'}"
             + (f" ({plan.devices_per_node} per node)" if plan.devices_per_node else "")
             + f": weights {st.get('weights')}, context {st.get('context')}, batch {st.get('batch')}, "
               f"KV {st.get('kv_layout')}"]
    if plan.candidates:
        lines.append("layouts (best first):")
        lines.append("    dp    tp    ep  redund  slots  GiB/rank  margin GiB  comm us/tok  step ms  tok/s/dev")
        for c in plan.candidates:
            lines.append(f"  {c['dp']:4d}  {c['tp']:4d}  {c['ep']:4d}  {c['redundant']:6d}  {c['slots_per_rank']:5d}  "
                         f"{c['peak_bytes'] / GiB:8.2f}  {c['margin_bytes'] / GiB:10.2f}  {c['comm_us_per_token']:11.1f}"
                         f"  {c['step_ms']:7.2f}  {c['tokens_per_s_per_device']:9.1f}" + ("" if c["fits"] else "  (no fit)"))
        lines.append(f"winner dp{plan.dp}/tp{plan.tp}/ep{plan.ep}: {plan.candidates[0].get('why', '')}")
    else:
        lines.append(f"layout dp{plan.dp}/tp{plan.tp}/ep{plan.ep}")
    lines.append(f"experts: {plan.n_routed_experts} logical + {plan.redundant} redundant = "
                 f"{plan.n_physical_experts} slots, {plan.slots_per_rank} per EP rank, {plan.n_moe_layers} MoE layers")
    lines += _memory_lines(plan)
    b = plan.balance
    if b:
        mean = {k: float(np.mean(v)) for k, v in b.items() if isinstance(v, list) and v}
        worst = {k: float(np.min(v)) for k, v in b.items() if isinstance(v, list) and v}
        lines.append(f"expert balancedness ({b.get('load')} load; mean / worst layer): before "
                     f"{mean['before']:.4f} / {worst['before']:.4f}, after {mean['after']:.4f} / {worst['after']:.4f},"
                     f" EPLB greedy {mean['eplb']:.4f} / {worst['eplb']:.4f}, bound {mean['bound']:.4f}")
    return lines


@click.group(invoke_without_command=True)
@click.option("--preset", type=click.Choice(["flash", "pro", "tiny"]), help="Model preset (default flash).")
@click.option("--config", "config_dir", type=click.Path(exists=True), help="Checkpoint dir or config.json.")
@click.option("--hardware", default="atlas-800-a3", show_default=True, help="Device or system name.")
@click.option("--hardware-file", type=click.Path(exists=True, dir_okay=False), help="YAML/JSON with more hardware.")
@click.option("--nodes", type=click.IntRange(min=1), help="Number of nodes (default 1, or the whole SuperPoD).")
@click.option("--devices", type=int, help="Number of devices (ranks); overrides --nodes.")
@click.option("--context", default=131072, show_default=True, help="Tokens per sequence the KV cache holds.")
@click.option("--batch", default=32, show_default=True, help="Concurrent sequences over the whole deployment.")
@click.option("--weights", type=click.Choice(WEIGHT_MODES), default="keep", show_default=True,
              help="keep = as published (FP8 / FP4 experts).")
@click.option("--kv", "kv_layout", type=click.Choice(KV_LAYOUTS), default="fp8", show_default=True,
              help="KV cache entry layout.")
@click.option("--expert-load", help="[layers, experts] load (.npy/.json/.csv) or lognormal:SIGMA[:SEED].")
@click.option("--redundant", type=int, help="Redundant expert slots (default: fewest that fill every rank).")
@click.option("--groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Expert groups for the EPLB baseline (nodes = groups).")
@click.option("--tp", type=click.IntRange(min=1), help="Force the tensor-parallel degree.")
@click.option("--ep", type=click.IntRange(min=1), help="Force the expert-parallel degree.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write plan.json here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of memory per rank here.")
@click.option("--plot-placement", type=click.Path(dir_okay=False),
              help="Write a PNG heat map of expert load per MoE layer and EP rank, before / after placement.")
@click.option("--export-eplb", type=click.Path(dir_okay=False), help="Write DeepSeek EPLB arrays (.npz).")
@click.option("--export-vllm", type=click.Path(dir_okay=False), help="Write a vllm-ascend expert map JSON.")
@json_option
@click.pass_context
def plan(ctx: click.Context, preset, config_dir, hardware, hardware_file, nodes, devices, context, batch, weights,
         kv_layout, expert_load, redundant, groups, tp, ep, out, plot, plot_placement, export_eplb, export_vllm,
         as_json) -> None:
    """Choose a parallel layout and expert placement; `ascend plan show plan.json` prints a saved plan."""
    if ctx.invoked_subcommand is not None:
        return
    from ascend.hardware import get_hardware
    from ascend.planner import export
    from ascend.planner.layout import plan_deployment

    config, name = _config(preset, config_dir)
    hw = get_hardware(hardware, hardware_file)
    if devices is None:
        devices = (nodes or hw.max_nodes or 1) * hw.devices_per_node
    if devices < 1:
        raise PlanError(f"--devices {devices}: expected a positive number")
    settings = MemorySettings(context=context, batch=batch, weights=weights, kv_layout=kv_layout,
                              reserve_bytes=int(hw.reserve_gib * GiB))
    load = _expert_load(expert_load, config)
    result = plan_deployment(config, hw, devices, settings, redundant=redundant, tp=tp, ep=ep,
                             expert_load=load, n_groups=groups, model=name,
                             distinct=bool(export_vllm))          # vllm-ascend: distinct experts per device
    _record_rank_loads(result, load)
    if out:
        result.save(out)
    if plot:
        from ascend.planner.plot import plot_memory
        plot_memory(result, plot)
    if plot_placement:
        from ascend.planner.plot import plot_placement as draw_placement
        draw_placement(result, plot_placement)
    args, notes = export.vllm_ascend_args(result, export_vllm or "expert_map.json")
    if export_eplb:
        export.write_eplb(result, export_eplb)
    if export_vllm:
        Path(export_vllm).write_text(json.dumps(export.vllm_ascend_expert_map(result)) + "\n")
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "vllm_ascend_args": args, "notes": notes}))
        return
    for line in _summary(result):
        click.echo(line)
    click.echo("vllm-ascend: " + " ".join(a if " " not in a and "{" not in a else f"'{a}'" for a in args))
    for note in notes:
        click.echo(f"note: {note}")
    for what, path in (("plan", out), ("plot", plot), ("placement plot", plot_placement),
                       ("EPLB arrays", export_eplb), ("expert map", export_vllm)):
        if path:
            click.echo(f"wrote {what}: {path}")


def _layer_lines(plan: Plan) -> list[str]:
    """Per MoE layer: balancedness before / after / EPLB / bound and replicas of the hottest expert."""
    b = plan.balance
    lines = ["layer  before   after    EPLB     bound    max replicas"]
    for i in range(plan.n_moe_layers):
        lines.append(f"{i:5d}  {b['before'][i]:.4f}   {b['after'][i]:.4f}   {b['eplb'][i]:.4f}   "
                     f"{b['bound'][i]:.4f}   {int(plan.logcnt[i].max()):5d}")
    return lines


@plan.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--layers", is_flag=True, help="Also print balancedness per MoE layer.")
@click.option("--plot-placement", type=click.Path(dir_okay=False),
              help="Write a PNG heat map of expert load per MoE layer and EP rank, before / after placement.")
@json_option
def show(path: str, layers: bool, plot_placement: str | None, as_json: bool) -> None:
    """Print a saved plan.json (after checking it)."""
    p = Plan.load(path)
    if plot_placement:
        from ascend.planner.plot import plot_placement as draw_placement
        draw_placement(p, plot_placement)
    if as_json:
        click.echo(json.dumps(p.to_dict()))
        return
    for line in _summary(p) + (_layer_lines(p) if layers and p.balance else []):
        click.echo(line)
    if plot_placement:
        click.echo(f"wrote placement plot: {plot_placement}")
