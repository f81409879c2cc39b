"""Exercise the device layer on the chosen backend and say what works.

    python scripts/check_device.py [--device auto|npu|cuda|cpu] [--quick] [--json]

Checks: synchronize, side streams ordered by events, event timing against the host clock, graph
capture + replay against eager, memory accounting for a known allocation. Every result is compared
with something computed independently (on the host, or by the eager path). Exit code 1 if any fails.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

import click
import torch

from ascend.cli import device_option, json_option, run_command
from ascend.device import Device, get_device


def check_synchronize(d: Device, n: int) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = (a.to(d.torch_device) @ b.to(d.torch_device)).cpu()
    d.synchronize()
    err = (out - a @ b).abs().max().item() / (a @ b).abs().max().item()
    return {"ok": err < 1e-2, "detail": f"{n}x{n} matmul vs host: rel err {err:.1e}"}


def check_streams(d: Device, n: int) -> dict:
    """Work on a side stream; the main stream waits on an event before using its result."""
    x = torch.randn(n, n, device=d.torch_device)
    side, done = d.stream(), d.event(enable_timing=False)
    side.wait_stream(d.current_stream())  # x was produced on the main stream
    with d.use_stream(side):
        y = torch.relu(x @ x.T)
        done.record(side)
    d.current_stream().wait_event(done)
    total = (y * 2).sum()
    d.synchronize()
    ref = (torch.relu(x.cpu() @ x.cpu().T) * 2).sum()
    err = abs(total.item() - ref.item()) / ref.item()
    return {"ok": err < 1e-2, "detail": f"side-stream result used after wait_event: rel err {err:.1e}"}


def check_events(d: Device, n: int, reps: int) -> dict:
    """Event time must be positive and within the host wall-clock time around it."""
    a = torch.randn(n, n, device=d.torch_device)
    a @ a  # warm-up outside the timed region
    d.synchronize()
    start, end = d.event(), d.event()
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        a @ a
    end.record()
    end.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    ms = start.elapsed_time(end)
    tflops = 2 * n**3 * reps / (ms * 1e-3) / 1e12
    return {"ok": 0 < ms <= wall_ms * 1.05 + 0.5,
            "detail": f"{reps} matmuls: event {ms:.2f} ms, host {wall_ms:.2f} ms ({tflops:.3g} TFLOPS fp32)"}


def check_graph(d: Device, n: int) -> dict:
    """Capture a small MLP step once, replay it on new inputs, compare with eager each time."""
    w1, w2 = torch.randn(n, 4 * n, device=d.torch_device) / n**0.5, torch.randn(4 * n, n, device=d.torch_device) / n**0.5
    step = lambda x: x + torch.nn.functional.silu(x @ w1) @ w2  # noqa: E731
    x = torch.randn(8, n, device=d.torch_device)
    g = d.graph()
    out = g.capture(step, x)
    worst = 0.0
    for _ in range(3):
        x.copy_(torch.randn(8, n))
        g.replay()
        d.synchronize()
        worst = max(worst, (out - step(x)).abs().max().item())
    return {"ok": worst < 1e-4, "detail": f"{type(g).__name__} replay vs eager on 3 new inputs: max |diff| {worst:.1e}"}


def check_memory(d: Device, mib: int) -> dict:
    """A known allocation must show up in `allocated` and `peak`, and leave `allocated` when freed."""
    d.synchronize()
    d.empty_cache()
    d.reset_peak()
    before = d.memory()
    x = torch.ones(mib * 2**18, device=d.torch_device)  # mib MiB of fp32, every element written
    d.synchronize()
    held = d.memory()
    del x
    d.empty_cache()
    after = d.memory()
    grew = (held.allocated - before.allocated) / 2**20
    ok = grew >= 0.9 * mib and held.peak >= held.allocated and 0 < held.free <= held.total \
        and after.allocated < held.allocated
    return {"ok": ok, "detail": f"+{mib} MiB tensor: allocated +{grew:.1f} MiB, peak {held.peak / 2**20:.0f} MiB, "
                                f"freed to {after.allocated / 2**20:.0f} MiB; {held.free / 2**30:.1f} of "
                                f"{held.total / 2**30:.1f} GiB free"}


def run_checks(d: Device, quick: bool) -> dict[str, dict]:
    small = quick or d.type == "cpu"  # the host is shared: keep CPU runs small even without --quick
    n = 256 if small else 4096
    checks: dict[str, Callable[[], dict]] = {
        "synchronize": lambda: check_synchronize(d, n),
        "streams": lambda: check_streams(d, n),
        "events": lambda: check_events(d, n, 3 if small else 20),
        "graph": lambda: check_graph(d, 64 if small else 1024),
        "memory": lambda: check_memory(d, 64 if small else 1024),
    }
    results = {}
    for name, fn in checks.items():
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 -- report every check, one failure must not hide the rest
            results[name] = {"ok": False, "detail": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
    return results


@click.command()
@device_option
@json_option
@click.option("--quick", is_flag=True, help="Small sizes (what CI runs on CPU).")
def main(device: str, as_json: bool, quick: bool) -> None:
    """Exercise streams, events, graph capture, memory stats and synchronize on one backend."""
    d = get_device(device)
    results = run_checks(d, quick)
    if as_json:
        click.echo(json.dumps({"backend": d.type, "soc": d.soc, "reason": d.reason, "checks": results}, indent=2))
    else:
        click.echo(f"backend {d.type} ({d.soc}): {d.reason}")
        width = max(map(len, results)) + 2
        for name, r in results.items():
            click.echo(f"{name:<{width}}{'ok  ' if r['ok'] else 'FAIL'}  {r['detail']}")
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    run_command(main)  # same one-line errors and exit codes as the ascend command
