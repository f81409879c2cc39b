#!/usr/bin/env python3
"""Whole-model benchmark of DeepSeek-V4: throughput, decode latency per layer type, KV-cache bytes per token.

Three tables, every number measured in this run:

1. prefill and decode tokens/s of the whole model (random quantised weights) and the peak device memory; decode
   eagerly and, on an accelerator, replayed from a captured graph (the MoE's static-shape path; --no-graph skips);
2. decode latency of one block (mHC + attention + MoE) per layer type (window-only, CSA, HCA) at each context,
   with the ratio to the smallest context. The cache is filled SYNTHETICALLY for this table: random entries in
   every buffer and lengths set to context - 1, so a 1M context needs no 1M-token prefill; the work per step is
   the real one (window, indexer over all visible keys, top-k, HCA over all visible entries);
3. KV-cache bytes per token measured from the allocated tensors (window ring, compressed entries, indexer keys,
   compressor state, amortised over the context) per layer type and for the model, bf16 entries and the 584-byte
   fp8 layout, against a dense GQA cache (8 KV heads x 128 dims, K and V, BF16 = 4096 B per token per layer).

    python3 scripts/bench_model.py --quick                          # CPU, tiny preset: checks the script
    python3 scripts/bench_model.py --preset flash --layers 4        # H200: Flash width, 4 layers, 256 experts
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ascend.argtypes import positive, positive_list
from ascend.device import Device, get_device
from ascend.graph import DecodeGraphRunner
from ascend.model_session import compute_dtype
from model.cache import KVCache, cache_bytes_per_token, encode_index_entries, encode_main_entries
from model.config import ModelConfig
from model.kernels import REFERENCE
from model.transformer import Transformer, init_random_

GQA_BYTES_PER_TOKEN_PER_LAYER = 2 * 8 * 128 * 2          # K and V, 8 heads x 128 dims, BF16
LAYER_TYPES = {0: "window", 4: "csa", 128: "hca"}


# ----------------------------------------------------------------------------------------------- helpers
def table(title: str, headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[c if isinstance(c, str) else f"{c:,.4g}" if isinstance(c, float) else str(c) for c in r]
                         for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([title, line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def timed(device: Device, fn, reps: int) -> float:
    """Median wall milliseconds of fn() over `reps` runs after one warm-up, the device synchronised around each."""
    fn()
    times = []
    for _ in range(reps):
        device.synchronize()
        t0 = time.perf_counter()
        fn()
        device.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fill_synthetic(cache: KVCache, context: int, g: torch.Generator) -> None:
    """Random entries in every cache buffer and every sequence at length context - 1 (see the module docstring)."""
    for layer in cache.layers:
        rows = layer.kv.shape[1]
        values = torch.randn(layer.kv.shape[0], rows, layer.head_dim, generator=g, device=layer.kv.device)
        layer.kv.copy_(encode_main_entries(values, layer.rope_dim) if layer.layout == "fp8" else values)
        if layer.index_kv is not None:
            keys = torch.randn(layer.index_kv.shape[0], layer.index_kv.shape[1], layer.index_dim, generator=g,
                               device=layer.kv.device)
            layer.index_kv.copy_(encode_index_entries(keys) if layer.layout == "fp8" else keys)
    cache.lengths.fill_(context - 1)


def layer_cache_bytes(layer) -> int:
    total = layer.kv.nbytes + (layer.index_kv.nbytes if layer.index_kv is not None else 0)
    for state in (layer.compressor, layer.index_compressor):
        if state is not None:
            total += state.kv.nbytes + state.score.nbytes
    return total


# ----------------------------------------------------------------------------------------------- the three tables
def throughput(model: Transformer, device: Device, batch: int, prefill_len: int, steps: int,
               graphs: bool) -> list[list]:
    """Prefill then decode tokens/s; decode eagerly and, with `graphs`, replayed from a captured graph (from the
    same prefilled state: the cache lengths are put back between the two)."""
    cfg = model.config
    g = torch.Generator(device=device.torch_device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, prefill_len + steps), generator=g, device=device.torch_device)
    rows = []
    with torch.no_grad():
        model(ids[:, :8], model.new_cache(batch, 16))              # warm-up (allocator, lazy kernels)
        device.empty_cache()
        device.reset_peak()
        cache = model.new_cache(batch, prefill_len + steps)
        device.synchronize()
        t0 = time.perf_counter()
        model(ids[:, :prefill_len], cache)
        device.synchronize()
        t_prefill = time.perf_counter() - t0
        peak_prefill = device.memory().peak
        rows.append(["prefill", batch * prefill_len, t_prefill, batch * prefill_len / t_prefill, 1.0,
                     peak_prefill / 2**30])
        prefilled = cache.lengths.clone()

        def step(tokens):
            return model(tokens, cache)

        decoders = [("decode (eager)", step)]
        if graphs:
            runner = DecodeGraphRunner(step, lambda b: (ids[:b, prefill_len:prefill_len + 1].clone(),), device,
                                       buckets=(batch,), warmup=2)
            runner.capture()
            label = "decode (graph)" if device.type != "cpu" else "decode (graph, eager re-run on CPU)"
            decoders.append((label, runner))
        for label, fn in decoders:
            fn(ids[:, prefill_len:prefill_len + 1])               # warm-up step (lazy kernels), then start over
            cache.lengths.copy_(prefilled)
            device.synchronize()
            t0 = time.perf_counter()
            for s in range(steps):
                fn(ids[:, prefill_len + s:prefill_len + s + 1])
            device.synchronize()
            t_decode = time.perf_counter() - t0
            decode_tps = batch * steps / t_decode
            rows.append([label, batch * steps, t_decode, decode_tps, decode_tps / rows[0][3],
                         device.memory().peak / 2**30])
        del decoders, cache
        device.empty_cache()
    return rows


def decode_latency(model: Transformer, device: Device, batch: int, contexts: list[int], layout: str,
                   reps: int) -> tuple[list[str], list[list]]:
    cfg = model.config
    first_of_type: dict[int, int] = {}
    for i in range(cfg.n_layers):
        first_of_type.setdefault(cfg.compress_ratio(i), i)
    g = torch.Generator(device=device.torch_device).manual_seed(2)
    dev = device.torch_device
    results: dict[str, list[float]] = {LAYER_TYPES[r]: [] for r in sorted(first_of_type)}
    results["whole model"] = []
    with torch.no_grad():
        for ctx in contexts:
            cache = KVCache(cfg, batch, ctx, model.dtype, layout, dev)
            fill_synthetic(cache, ctx, g)
            start = cache.lengths.clone()
            n_valid = torch.ones(batch, dtype=torch.int64, device=dev)
            ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g, device=dev)
            streams = torch.randn(batch, 1, cfg.hc_mult, cfg.dim, generator=g, device=dev).to(model.dtype)
            for ratio, layer_id in sorted(first_of_type.items()):
                block = model.layers[layer_id]
                results[LAYER_TYPES[ratio]].append(
                    timed(device, lambda: block(streams, start, n_valid, cache.layers[layer_id], ids), reps))

            def step():
                model(ids, cache)
                cache.lengths.copy_(start)                    # stay at the same context
            results["whole model"].append(timed(device, step, reps))
            del cache
            device.empty_cache()
    headers = ["decode ms / step"] + [f"ctx {c:,}" for c in contexts] + [f"x ({contexts[-1]:,} / {contexts[0]:,})"]
    rows = [[name] + vals + [vals[-1] / vals[0]] for name, vals in results.items()]
    return headers, rows


def cache_bytes(cfg: ModelConfig, device: Device, contexts: list[int]) -> tuple[list[str], list[list]]:
    rows = []
    for ctx in contexts:
        per_layout = {}
        for layout in ("bf16", "fp8"):
            cache = KVCache(cfg, 1, ctx, torch.bfloat16, layout, device.torch_device, n_layers=cfg.n_layers)
            per_type: dict[str, int] = {}
            for i, layer in enumerate(cache.layers):
                name = LAYER_TYPES[cfg.compress_ratio(i)]
                per_type[name] = per_type.get(name, 0) + layer_cache_bytes(layer)
            per_layout[layout] = per_type
            del cache
        counts = {LAYER_TYPES[r]: sum(1 for i in range(cfg.n_layers) if cfg.compress_ratio(i) == r)
                  for r in LAYER_TYPES}
        for name in sorted(per_layout["bf16"]):
            n = counts[name]
            bf16, fp8 = (per_layout[lay][name] / ctx / n for lay in ("bf16", "fp8"))
            rows.append([f"{ctx:,}", f"{name} (per layer)", bf16, fp8, float(GQA_BYTES_PER_TOKEN_PER_LAYER),
                         fp8 / GQA_BYTES_PER_TOKEN_PER_LAYER])
        bf16, fp8 = (sum(per_layout[lay].values()) / ctx for lay in ("bf16", "fp8"))
        gqa = float(GQA_BYTES_PER_TOKEN_PER_LAYER * cfg.n_layers)
        rows.append([f"{ctx:,}", f"model ({cfg.n_layers} layers)", bf16, fp8, gqa, fp8 / gqa])
    headers = ["context", "cache", "bytes/token bf16", "bytes/token fp8", "GQA 8x128 bf16", "fp8 / GQA"]
    return headers, rows


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash", choices=["flash", "pro", "tiny"])
    ap.add_argument("--layers", type=positive, default=4, help="main layers kept (the published schedule's first ones)")
    ap.add_argument("--device", default="auto", help="auto | cuda | npu | cpu")
    ap.add_argument("--backend", default="reference", choices=["reference", "auto"],
                    help="kernels: pure-PyTorch reference, or the device's backend (ascend.backends)")
    ap.add_argument("--experts", type=positive, default=None, help="routed experts per layer (default: the preset's)")
    ap.add_argument("--act-quant", action="store_true", help="FP8 activation rounding in fp8/fp4 projections")
    ap.add_argument("--batch", type=positive, default=1)
    ap.add_argument("--prefill-len", type=positive, default=4096)
    ap.add_argument("--decode-steps", type=positive, default=32)
    ap.add_argument("--contexts", type=positive_list, default=(4096, 131072, 1048576),
                    help="comma-separated decode contexts")
    ap.add_argument("--layout", default="bf16", choices=["bf16", "fp8"], help="cache layout for the latency table")
    ap.add_argument("--reps", type=positive, default=5)
    ap.add_argument("--no-graph", action="store_true",
                    help="decode eagerly only (default on CUDA / NPU and with --quick: also from a captured graph)")
    ap.add_argument("--quick", action="store_true", help="tiny preset on CPU with small sizes (checks the script)")
    ap.add_argument("--threads", type=positive, default=None, help="CPU threads (default: torch's; 1 with --quick)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.device, args.layers = "tiny", "cpu", 4
        args.prefill_len, args.decode_steps, args.contexts, args.reps = 32, 4, (128, 512), 1
        args.threads = args.threads or 1          # a shared CI box: oversubscribed threads make CPU timings noise
    if args.threads:
        torch.set_num_threads(args.threads)

    device = get_device(args.device)
    torch.manual_seed(0)
    contexts = list(args.contexts)
    base = ModelConfig.preset(args.preset)
    cfg = ModelConfig.preset(args.preset, n_layers=min(args.layers, base.n_layers),
                             n_routed_experts=args.experts or base.n_routed_experts, act_quant=args.act_quant,
                             max_seq_len=max(base.max_seq_len, *contexts, args.prefill_len + args.decode_steps))
    dtype = compute_dtype(device.type)
    kernels = REFERENCE
    if args.backend == "auto":
        from ascend.backends import get_kernels
        kernels = get_kernels(device)
    with torch.device(device.torch_device):
        model = init_random_(Transformer(cfg, kernels=kernels, dtype=dtype)).eval()
    weight_gib = sum(t.nbytes for t in model.state_dict().values()) / 2**30

    tp_rows = throughput(model, device, args.batch, args.prefill_len, args.decode_steps,
                         graphs=not args.no_graph and (device.type != "cpu" or args.quick))  # --quick checks that path
    lat_headers, lat_rows = decode_latency(model, device, args.batch, contexts, args.layout, args.reps)
    cb_headers, cb_rows = cache_bytes(cfg, device, contexts)
    accounting = {lay: cache_bytes_per_token(base, lay) for lay in ("bf16", "fp8")}

    if args.json:
        print(json.dumps({"device": device.name, "preset": args.preset, "layers": cfg.n_layers,
                          "weights_gib": weight_gib, "throughput": tp_rows, "decode_latency_ms": lat_rows,
                          "cache_bytes_per_token": cb_rows, f"accounting_{args.preset}": accounting}, default=str))
        return
    print(f"DeepSeek-V4 {args.preset} width, {cfg.n_layers} layers + {cfg.n_mtp_layers} MTP, "
          f"{cfg.n_routed_experts} experts ({cfg.expert_dtype}), weights {weight_gib:.2f} GiB, {dtype}, "
          f"kernels={args.backend}, device={device.name}\n")
    print(table("throughput (batch {})".format(args.batch),
                ["phase", "tokens", "seconds", "tokens/s", "x prefill", "peak GiB"], tp_rows), "\n")
    print(table(f"decode latency per block, batch {args.batch}, cache layout {args.layout} "
                "(cache filled synthetically: random entries, length = context - 1)", lat_headers, lat_rows), "\n")
    print(table("KV cache bytes per token, measured from the allocated tensors (main layers; window ring and "
                "compressor state amortised over the context)", cb_headers, cb_rows), "\n")
    for lay, acc in accounting.items():
        print(f"accounting for full {args.preset} ({lay} entries, cache_bytes_per_token): "
              f"{acc['total']:,.0f} B/token + {acc['window_bytes_per_sequence'] / 2**20:.1f} MiB window per sequence; "
              f"GQA 8x128 bf16 over {base.n_layers} layers: {GQA_BYTES_PER_TOKEN_PER_LAYER * base.n_layers:,} B/token "
              f"({acc['total'] / (GQA_BYTES_PER_TOKEN_PER_LAYER * base.n_layers):.1%})")


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2
