#!/usr/bin/env python3
"""Launcher-path decode benchmark on one device: what `ascend run` serves per second, against its roofline.

A reduced-depth model at full width (default: V4-Flash width, 4 layers, all 256 routed experts, random
weights) runs the launcher's own session (model.generate prefill / decode_step on a KV cache), decode
replayed from captured graphs where the device has them (ascend.graph.DecodeGraphRunner; eager on CPU).
For every (prompt length, batch):

- prefill: one sequence of the prompt length, in chunks; its cache rows are copied to every sequence of the
  batch (the same context for all, so a 64K x 32 prefill is not needed to measure decode at 64K);
- decode tokens/s over --steps steps, eager and replayed from a captured graph (the MoE layers take their
  static-shape path; `--no-graph` measures eager only), and the roofline: (weight bytes read + KV-cache
  bytes read) per step over the device copy bandwidth measured in this run, i.e. the best a memory-bound
  step could do here;
- baseline in the same run: HF transformers' DeepseekV4ForCausalLM on the same weights when the installed
  transformers has it (greedy decode tokens/s at the shortest prompt, and logits agreement of the prompt's
  last position); otherwise the table says why it was skipped.

    python3 scripts/bench_launch.py --quick                 # CPU, tiny width: checks the script end to end
    python3 scripts/bench_launch.py                         # one H200: Flash width, 4 layers, 1K/64K x 1/32
    python3 scripts/bench_launch.py --no-graph --no-hf      # eager decode only, no baseline
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ascend.backends import get_kernels
from ascend.device import Device, get_device
from ascend.graph import DecodeGraphRunner
from model.config import ModelConfig
from model.generate import decode_step, prefill
from model.moe import MOE_MODES, MoE, set_moe_mode
from model.transformer import Transformer, init_random_


# ------------------------------------------------------------------------------------------------- model
@torch.no_grad()
def random_model(cfg: ModelConfig, device: Device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Random weights; every layer's routed experts share one random expert's bytes (initialising 256 x 4
    FP4 experts one by one on the host takes longer than the benchmark; speed does not depend on values)."""
    with torch.device(device.torch_device):
        model = Transformer(cfg, kernels=get_kernels(device), dtype=dtype)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    held = [m.experts for m in moes]
    for m in moes:
        m.experts = nn.ModuleDict()
    init_random_(model, seed)
    for i, (m, experts) in enumerate(zip(moes, held)):
        m.experts = experts
        first = next(iter(experts.values()))
        init_random_(first, seed + 1 + i)
        for e in experts.values():
            for dst, src in zip(e.parameters(), first.parameters()):
                dst.copy_(src)
    return model.eval()


def weight_bytes_per_step(model: Transformer, batch: int) -> int:
    """Bytes of weights a decode step reads: everything but routed experts, plus the experts `batch` tokens
    touch in expectation (each token picks k of E)."""
    cfg = model.config
    expert_bytes, other = 0, 0
    for name, p in model.named_parameters():
        if ".experts." in name and not name.startswith("mtp."):
            expert_bytes += p.nbytes
        elif not name.startswith("mtp."):
            other += p.nbytes
    touched = 1 - (1 - cfg.n_activated_experts / cfg.n_routed_experts) ** batch
    return int(other + expert_bytes * touched)


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers[:len(cache.layers)]:
        total += layer.kv.nbytes + (layer.index_kv.nbytes if layer.index_kv is not None else 0)
    return total


def copy_bandwidth(device: Device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from timed copies (each copy reads and writes nbytes)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device.torch_device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    device.synchronize()
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    device.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t0)


@torch.no_grad()
def replicate_rows(src, dst) -> None:
    """Copy sequence 0 of cache `src` into every sequence of cache `dst` (same max_len)."""
    for a, b in zip(src.layers, dst.layers):
        b.kv.copy_(a.kv[:1].expand_as(b.kv))
        if a.index_kv is not None:
            b.index_kv.copy_(a.index_kv[:1].expand_as(b.index_kv))
        for sa, sb in ((a.compressor, b.compressor), (a.index_compressor, b.index_compressor)):
            if sa is not None:
                sb.kv.copy_(sa.kv[:1].expand_as(sb.kv))
                sb.score.copy_(sa.score[:1].expand_as(sb.score))
    dst.lengths.copy_(src.lengths[:1].expand_as(dst.lengths))


# ------------------------------------------------------------------------------------------------- measure
def timed_decode(fn, tokens: torch.Tensor, active: torch.Tensor, steps: int, device: Device) -> float:
    """Seconds for `steps` greedy decode steps of fn(tokens, active) -> logits, the device synchronised around."""
    device.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = fn(tokens, active).argmax(-1)
    device.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def run_case(model: Transformer, device: Device, prompt_len: int, batch: int, steps: int, chunk: int,
             graphs: bool) -> dict:
    """Prefill one prompt, copy its cache to `batch` rows, then decode eagerly and (with `graphs`) from a
    captured graph, each from the same prefilled state."""
    cfg = model.config
    device.empty_cache()
    device.reset_peak()
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(2, cfg.vocab_size, (prompt_len,), generator=g).tolist()
    max_len = prompt_len + steps + 3    # room for the capture's warm-up + capture steps
    one = model.new_cache(1, max_len)
    device.synchronize()
    t0 = time.perf_counter()
    logits = prefill(model, [prompt], one, chunk)
    device.synchronize()
    prefill_s = time.perf_counter() - t0
    cache = model.new_cache(batch, max_len)
    first = logits.argmax(-1).expand(batch).contiguous()
    active = torch.ones(batch, dtype=torch.bool, device=first.device)

    def step(tok, act):
        return decode_step(model, tok, cache, act)

    timed_decode(step, first, active, 2, device)      # warm-up: lazy kernel builds, allocator
    replicate_rows(one, cache)
    eager_s = timed_decode(step, first, active, steps, device)
    graph_s, mode = None, "off (--no-graph)"
    if graphs:
        try:
            runner = DecodeGraphRunner(step, lambda b: (first[:b].clone(), active[:b].clone()), device,
                                       buckets=(batch,), warmup=2)
            replicate_rows(one, cache)      # capture runs the step warmup + 1 times: from the prefilled lengths
            runner.capture()
            replicate_rows(one, cache)      # capture ran the step: start again from the prefilled state
            graph_s = timed_decode(runner, first, active, steps, device)
            mode = "captured" if device.type != "cpu" else "eager re-run (CPU has no graphs)"
            del runner
        except Exception as e:  # noqa: BLE001 -- report it; the eager numbers stand
            mode = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    row = {"prompt": prompt_len, "batch": batch, "prefill_tok_s": prompt_len / prefill_s,
           "eager_tok_s": batch * steps / eager_s, "eager_step_ms": eager_s / steps * 1e3,
           "graph_tok_s": batch * steps / graph_s if graph_s else None,
           "graph_step_ms": graph_s / steps * 1e3 if graph_s else None,
           "bytes_per_step": weight_bytes_per_step(model, batch) + cache_bytes(cache), "graph": mode,
           "peak_gib": device.memory().peak / 2**30}
    del one, cache, logits
    device.empty_cache()
    return row


def official_checkpoint(model: Transformer, quantised: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Our weights as an official-layout state dict + config.json (quantised as published, or all BF16)."""
    from model.linear import Linear

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.config.to_hf_dict()
    if not quantised:
        for name, module in model.named_modules():
            if isinstance(module, Linear) and getattr(module, "scale", None) is not None:
                state[f"{name}.weight"] = module.dequantized(torch.bfloat16).cpu()
                state.pop(f"{name}.scale")
        config.pop("quantization_config", None)
        config.pop("expert_dtype", None)
    return state, config


@torch.no_grad()
def hf_baseline(model: Transformer, device: Device, prompt_len: int, batches: list[int], steps: int) -> dict:
    """HF transformers' DeepseekV4ForCausalLM on our weights (saved as an official-layout checkpoint)."""
    try:
        from transformers import DeepseekV4ForCausalLM
    except Exception as e:  # noqa: BLE001 -- not installed, or too old to have deepseek_v4
        return {"skipped": f"transformers without DeepseekV4ForCausalLM ({type(e).__name__})"}
    from safetensors.torch import save_file

    cfg = model.config
    hf, tried = None, []
    for quantised in (True, False):  # the published layout first; then dequantised BF16 without scales
        try:
            with tempfile.TemporaryDirectory() as tmp:
                state, config = official_checkpoint(model, quantised)
                save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
                del state
                (Path(tmp) / "config.json").write_text(json.dumps(config))
                try:
                    hf, info = DeepseekV4ForCausalLM.from_pretrained(
                        tmp, dtype=model.dtype, output_loading_info=True, device_map=str(device.torch_device))
                except (ImportError, ValueError) as e:   # device_map needs `accelerate`: load, then move
                    if "accelerate" not in str(e):
                        raise
                    hf, info = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=model.dtype, output_loading_info=True)
                    hf = hf.to(device.torch_device)
            # from_pretrained random-initialises what it could not map: that would be a baseline of noise
            missing = sorted(info.get("missing_keys") or [])
            mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
            if missing or mismatched:
                bad = (missing + mismatched)
                del hf
                hf = None
                raise RuntimeError(f"{len(bad)} HF tensors not filled from our checkpoint, e.g. {bad[:3]}")
            break
        except Exception as e:  # noqa: BLE001 -- record why, try the other layout
            tried.append(f"{'fp8/fp4' if quantised else 'bf16'}: {type(e).__name__}: {str(e)[:200]}")
    if hf is None:
        device.empty_cache()
        return {"skipped": "transformers could not load our weights (" + "; ".join(tried) + ")"}
    try:
        hf.eval()
        g = torch.Generator().manual_seed(prompt_len)
        ids = torch.randint(2, cfg.vocab_size, (1, prompt_len), generator=g).to(device.torch_device)
        ours = model(ids, model.new_cache(1, prompt_len + 1))
        theirs = hf(ids).logits[:, -1].float()
        out = {"cosine": float(torch.nn.functional.cosine_similarity(ours, theirs).item()),
               "max_abs_diff": float((ours - theirs).abs().max()), "argmax_equal": bool((ours.argmax(-1) ==
                                                                                          theirs.argmax(-1)).all())}
        def timed_generate(x, n):
            device.synchronize()
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            device.synchronize()
            return time.perf_counter() - t0

        for b in batches:
            x = ids.expand(b, -1)
            timed_generate(x, 2)  # warm-up
            # decode only: generating `steps` tokens minus generating 1 (the prefill and first token)
            out[f"decode_tok_s_b{b}"] = b * (steps - 1) / max(1e-9, timed_generate(x, steps) - timed_generate(x, 1))
        return out
    except Exception as e:  # noqa: BLE001 -- the baseline must not stop our own measurements
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    finally:
        del hf
        device.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: tiny width, 2 layers, short prompts")
    p.add_argument("--preset", default="flash", choices=["flash", "pro", "tiny"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens)")
    p.add_argument("--no-graph", "--no-graphs", dest="no_graph", action="store_true",
                   help="measure eager decode only (no graph capture)")
    p.add_argument("--moe", default="auto", choices=list(MOE_MODES),
                   help="MoE path: auto (static for decode / capture), static, or dynamic (eager only)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.preset, args.layers, args.prompts, args.batches, args.steps, args.chunk = "tiny", 2, [64, 256], [1, 4], 4, 64
    device = get_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = ModelConfig.preset(args.preset, n_layers=args.layers,
                             max_seq_len=max(max(args.prompts) + args.steps + 3, 1024))
    t0 = time.perf_counter()
    model = random_model(cfg, device, dtype)
    set_moe_mode(model, args.moe)
    build_s = time.perf_counter() - t0
    bandwidth = copy_bandwidth(device, 2**30 if device.type != "cpu" else 2**27)
    graphs = not args.no_graph and args.moe != "dynamic"
    rows = [run_case(model, device, pl, b, args.steps, args.chunk, graphs) for pl in args.prompts for b in args.batches]
    for r in rows:
        r["roofline_tok_s"] = r["batch"] * bandwidth / r["bytes_per_step"]
        best = max(r["eager_tok_s"], r["graph_tok_s"] or 0.0)
        r["of_roofline"] = best / r["roofline_tok_s"]
    hf = {"skipped": "--no-hf"} if args.no_hf else hf_baseline(model, device, min(args.prompts), args.batches, args.steps)
    for r in rows:
        key = f"decode_tok_s_b{r['batch']}"
        best = max(r["eager_tok_s"], r["graph_tok_s"] or 0.0)
        r["vs_hf"] = best / hf[key] if key in hf and r["prompt"] == min(args.prompts) else None
    doc = {"device": str(device), "preset": args.preset, "layers": args.layers, "experts": cfg.n_routed_experts,
           "expert_dtype": cfg.expert_dtype, "dtype": str(dtype), "moe": args.moe, "build_s": build_s,
           "copy_bandwidth_gb_s": bandwidth / 1e9, "cases": rows, "hf": hf}
    if args.json:
        print(json.dumps(doc))
        return
    print(f"{device}: {args.preset} width, {args.layers} layers, {cfg.n_routed_experts} experts ({cfg.expert_dtype}), "
          f"{dtype}, MoE {args.moe}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (measured); model built in "
          f"{build_s:.1f} s")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'prompt':>7} {'batch':>5} {'prefill tok/s':>13} {'eager tok/s':>11} {'graph tok/s':>11} "
          f"{'graph x':>7} {'step ms e/g':>13} {'MB/step':>8} {'roofline tok/s':>14} {'of roof':>7} {'vs HF':>6} "
          f"{'peak GiB':>8}  graph")
    for r in rows:
        speedup = r["graph_tok_s"] / r["eager_tok_s"] if r["graph_tok_s"] else None
        steps_ms = f"{r['eager_step_ms']:.2f}/{fmt(r['graph_step_ms'], '.2f')}"
        print(f"{r['prompt']:>7} {r['batch']:>5} {r['prefill_tok_s']:>13.1f} {r['eager_tok_s']:>11.1f} "
              f"{fmt(r['graph_tok_s'], '.1f'):>11} {fmt(speedup, '.2f'):>7} {steps_ms:>13} "
              f"{r['bytes_per_step'] / 1e6:>8.1f} {r['roofline_tok_s']:>14.1f} {r['of_roofline']:>7.1%} "
              f"{fmt(r['vs_hf'], '.2f'):>6} {r['peak_gib']:>8.2f}  {r['graph']}")
    print("roofline: (weights a step reads, routed experts by expected distinct use, + whole KV cache) / copy "
          "bandwidth; 'of roof' and 'vs HF' use the faster of eager and graph")
    print("HF transformers baseline: " + ("skipped: " + hf["skipped"] if "skipped" in hf else
          f"logits cosine {hf['cosine']:.6f}, max |diff| {hf['max_abs_diff']:.3g}, argmax equal {hf['argmax_equal']}, "
          + ", ".join(f"batch {b}: {hf[f'decode_tok_s_b{b}']:.1f} tok/s" for b in args.batches)))


if __name__ == "__main__":
    main()
