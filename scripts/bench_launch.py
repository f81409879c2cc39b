#!/usr/bin/env python3
"""Launcher-path decode benchmark on one device: what `ascend run` serves per second, against its roofline.

A reduced-depth model at full width (default: V4-Flash width, 4 layers, all 256 routed experts, random
weights) runs the launcher's own session (model.generate prefill / decode_step on a KV cache), decode
replayed from captured graphs where the device has them (ascend.graph.DecodeGraphRunner; eager on CPU).
For every (prompt length, batch):

- prefill: one sequence of the prompt length, in chunks; its cache rows are copied to every sequence of the
  batch (the same context for all, so a 64K x 32 prefill is not needed to measure decode at 64K); decode then
  starts from a different random token in each sequence (`first_tokens`), so the sequences route to different
  experts as real ones do (the same token everywhere would route every row to the same 6 experts);
- decode tokens/s over --steps steps, eager and replayed from a captured graph (the MoE layers take their
  static-shape path; `--no-graph` measures eager only); with `--compile` also the whole decode step compiled by
  `ascend.backends.cuda.compile_decode` (torch.compile, one static graph) and then captured, with its first
  step's logits against the eager step's from the same state; and the roofline: (weight bytes read + KV-cache
  bytes read) per step over the device copy bandwidth measured in this run, i.e. the best a memory-bound
  step could do here;
- baseline in the same run: HF transformers' DeepseekV4ForCausalLM, built in memory and filled with our weights
  dequantised (no checkpoint written, no HF fp8 quantizer), when the installed transformers has it: greedy decode
  tokens/s per (prompt, batch) on its own cache (an out-of-memory prefill is reported as "OOM at prompt N batch
  B"; each case's decode is timed for at most --hf-limit seconds), and logits / greedy-token agreement on a short
  prompt with our FP8-KV / FP4-indexer simulations off (HF has neither); otherwise the table says why it was
  skipped. The HF model is freed before the script ends.

    python3 scripts/bench_launch.py --quick                 # CPU, tiny width: checks the script end to end
    python3 scripts/bench_launch.py                         # one H200: Flash width, 4 layers, 1K/64K x 1/32
    python3 scripts/bench_launch.py --no-graph --no-hf      # eager decode only, no baseline
    python3 scripts/bench_launch.py --compile --profile     # also the compiled step; where a step's time goes
    python3 scripts/bench_launch.py --compile --pick torch  # each step's token by torch.argmax (the old baseline)

`--profile` prints, per case, the kernels of one replayed decode step (torch.profiler; the graph's kernels when
the profiler sees inside graphs, else an eager step's) grouped by name: launches and device time per step.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from typing import Callable

import torch
from torch import nn

from ascend.argtypes import non_negative, positive
from ascend.backends import get_kernels
from ascend.device import Device, get_device
from ascend.graph import DecodeGraphRunner
from ascend.model_session import compute_dtype
from ascend.profiling import format_kernel_table, kernel_table, short_error, timed_decode
from model.config import ModelConfig
from model.generate import decode_step, prefill
from model.kernels import REFERENCE, use_kernels
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
    """Bytes of weights a decode step reads: everything but routed experts and the embedding table, plus the
    experts `batch` tokens touch in expectation (each token picks k of E) and the `batch` embedding rows the
    step gathers (the table itself, ~1 GB at V4-Flash, is never read whole)."""
    cfg = model.config
    expert_bytes, other = 0, 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            other += batch * p[0].nbytes
        elif ".experts." in name:
            expert_bytes += p.nbytes
        else:
            other += p.nbytes
    touched = 1 - (1 - cfg.n_activated_experts / cfg.n_routed_experts) ** batch
    return int(other + expert_bytes * touched)


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
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
def first_tokens(vocab: int, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    """A different random token per sequence for the first decode step (ours and HF's alike)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab - 2, generator=g)[:batch].add_(2).to(device)


def logit_gap(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Relative error of logits `a` against `b`, and the share of rows whose argmax agrees."""
    return {"rel_err": float((a - b).norm() / b.norm()),
            "argmax_equal": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


@torch.no_grad()
def run_case(model: Transformer, device: Device, prompt_len: int, batch: int, steps: int, chunk: int,
             graphs: bool, compile_step: bool = False, profile_steps: int = 0, pick: Callable | None = None) -> dict:
    """Prefill one prompt, copy its cache to `batch` rows, then decode eagerly, from a captured graph (`graphs`) and
    compiled then captured (`compile_step`), each from the same prefilled state. Each step's greedy token is
    `pick(logits)`; None: the model's `kernels.argmax`, as the launcher's sampler picks (the compiled step's table
    picks with the same function)."""
    cfg = model.config
    argmax = pick or model.kernels.argmax
    device.empty_cache()
    device.reset_peak()
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(2, cfg.vocab_size, (prompt_len,), generator=g).tolist()
    max_len = prompt_len + 2 * steps + profile_steps + 8    # room for warm-ups, captures and the profile
    one = model.new_cache(1, max_len)
    device.synchronize()
    t0 = time.perf_counter()
    logits = prefill(model, [prompt], one, chunk)
    device.synchronize()
    prefill_s = time.perf_counter() - t0
    cache = model.new_cache(batch, max_len)
    first = first_tokens(cfg.vocab_size, batch, prompt_len, logits.device)
    active = torch.ones(batch, dtype=torch.bool, device=first.device)

    def step(tok, act):
        return decode_step(model, tok, cache, act)

    def captured(fn):
        runner = DecodeGraphRunner(fn, lambda b: (first[:b].clone(), active[:b].clone()), device,
                                   buckets=(batch,), warmup=2)
        replicate_rows(one, cache)      # capture runs the step warmup + 1 times: from the prefilled lengths
        runner.capture()
        replicate_rows(one, cache)      # capture ran the step: start again from the prefilled state
        return runner

    timed_decode(step, first, active, 2, device, argmax)      # warm-up: lazy kernel builds, allocator
    replicate_rows(one, cache)
    eager_logits = step(first, active).clone()
    replicate_rows(one, cache)
    eager_s = timed_decode(step, first, active, steps, device, argmax)
    row = {"prompt": prompt_len, "batch": batch, "prefill_tok_s": prompt_len / prefill_s,
           "eager_tok_s": batch * steps / eager_s, "eager_step_ms": eager_s / steps * 1e3,
           "graph_tok_s": None, "graph_step_ms": None, "graph": "off (--no-graph)",
           "compiled_tok_s": None, "compiled_step_ms": None, "compile_s": None, "compiled_vs_eager": None,
           "compiled": "off" if not compile_step else ""}
    if graphs:
        try:
            runner = captured(step)
            graph_s = timed_decode(runner, first, active, steps, device, argmax)
            row.update(graph_tok_s=batch * steps / graph_s, graph_step_ms=graph_s / steps * 1e3,
                       graph="captured" if device.type != "cpu" else "eager re-run (CPU has no graphs)")
            if profile_steps and device.type == "cuda":
                row["profile"] = kernel_table(lambda: runner(first, active), profile_steps)
            del runner
        except Exception as e:  # noqa: BLE001 -- report it; the eager numbers stand
            row["graph"] = f"capture failed: {short_error(e, 80)}"
    if compile_step:
        from ascend.backends.cuda import compile_decode, make_kernels

        eager_kernels = model.kernels
        use_kernels(model, make_kernels(for_compile=True))
        torch._dynamo.reset()           # a new cache object and shapes: start from an empty compile cache
        try:
            fn = compile_decode(step)
            replicate_rows(one, cache)
            t0 = time.perf_counter()
            compiled_logits = fn(first, active).clone()
            row["compile_s"] = time.perf_counter() - t0
            row["compiled_vs_eager"] = logit_gap(compiled_logits, eager_logits)
            runner = captured(fn) if graphs else fn
            compiled_s = timed_decode(runner, first, active, steps, device, argmax)
            row.update(compiled_tok_s=batch * steps / compiled_s, compiled_step_ms=compiled_s / steps * 1e3,
                       compiled="compiled + captured" if graphs else "compiled, eager launches")
            if profile_steps and device.type == "cuda":
                row["compiled_profile"] = kernel_table(lambda: runner(first, active), profile_steps)
            del runner, fn
        except Exception as e:  # noqa: BLE001 -- report it; the other numbers stand
            row["compiled"] = f"failed: {short_error(e, 100)}"
        finally:
            use_kernels(model, eager_kernels)
            torch._dynamo.reset()
    row["bytes_per_step"] = weight_bytes_per_step(model, batch) + cache_bytes(cache)
    row["peak_gib"] = device.memory().peak / 2**30
    del one, cache, logits
    device.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------- HF baseline
# Official tensor name -> HF transformers' DeepseekV4ForCausalLM parameter name (its module tree, v5.x). Applied
# component by component; routed experts go into slices of HF's stacked `gate_up_proj` / `down_proj` (hf_target).
_HF_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
           "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_HF_PARTS = {"attn": "self_attn", "ffn": "mlp", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_sink": "sinks", "wq_a": "q_a_proj", "q_norm": "q_a_norm",
             "wq_b": "q_b_proj", "wkv": "kv_proj", "wgate": "gate_proj", "wo_a": "o_a_proj", "wo_b": "o_b_proj",
             "ape": "position_bias", "norm": "kv_norm", "bias": "e_score_correction_bias", "w1": "gate_proj",
             "w2": "down_proj", "w3": "up_proj"}


def hf_target(name: str, inter_dim: int) -> tuple[str, tuple]:
    """(HF parameter name, index into it) receiving official tensor `name`; index () is the whole tensor."""
    if name in _HF_TOP:
        return _HF_TOP[name], ()
    parts = name.split(".")                                  # layers.N.<...>
    prefix, rest = f"model.layers.{parts[1]}", parts[2:]
    if rest[0].startswith(("hc_attn_", "hc_ffn_")):          # layers.N.hc_attn_fn -> attn_hc.fn
        which, leaf = rest[0][3:].split("_", 1)
        return f"{prefix}.{which}_hc.{leaf}", ()
    if rest[:2] == ["ffn", "experts"]:                       # layers.N.ffn.experts.E.wK.weight
        e, w = int(rest[2]), rest[3]
        if w == "w2":
            return f"{prefix}.mlp.experts.down_proj", (e,)
        half = slice(0, inter_dim) if w == "w1" else slice(inter_dim, 2 * inter_dim)
        return f"{prefix}.mlp.experts.gate_up_proj", (e, half)
    if rest[:2] == ["attn", "indexer"]:                      # HF nests the indexer inside the compressor
        tail = rest[2:]     # compressor.X -> X; weights_proj sits in a `scorer`
        tail = tail[1:] if tail[0] == "compressor" else ["scorer"] + tail if tail[0] == "weights_proj" else tail
        rest = ["attn", "compressor", "indexer"] + tail
    return ".".join([prefix] + [_HF_PARTS.get(p, p) for p in rest]), ()


def our_tensors(model: Transformer, dtype: torch.dtype):
    """(official name, tensor) for every checkpoint tensor of the main model, quantised Linears dequantised to
    `dtype` one at a time (FP8 / FP4 -> dtype; `.scale` consumed), MTP left out (HF does not build it)."""
    from model.linear import Linear

    linears = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    for name, t in model.state_dict().items():
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if name.startswith("mtp."):
            continue
        if owner in linears:
            if leaf == "weight":
                yield name, model.get_submodule(owner).dequantized(dtype)
            continue
        yield name, t


@torch.no_grad()
def build_hf_model(model: Transformer, device: Device):
    """HF's DeepseekV4ForCausalLM built in memory (no checkpoint on disk, no HF fp8 quantizer) and filled from
    our weights, dequantised. Raises RuntimeError at the first HF tensor without exactly one source or with a
    different shape, so a baseline never runs on HF's random init."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = model.config
    spec = cfg.to_hf_dict()
    for key in ("quantization_config", "expert_dtype", "torch_dtype", "architectures"):
        spec.pop(key, None)
    hf_cfg = DeepseekV4Config(**spec)     # reads compress_ratios / num_hash_layers / qk_rope_head_dim / rope_scaling
    hf_cfg._attn_implementation = "eager"
    expect = {"layer_types": [("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
                              [(0, 4, 128).index(r)] for r in cfg.compress_ratios],
              "mlp_layer_types": ["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.n_layers)],
              "sliding_window": cfg.window_size, "qk_rope_head_dim": cfg.rope_head_dim}
    for key, want in expect.items():
        if getattr(hf_cfg, key, None) != want:
            raise RuntimeError(f"DeepseekV4Config.{key} = {getattr(hf_cfg, key, None)!r}, expected {want!r}")
    with torch.device(device.torch_device):
        hf = DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=model.dtype)
    hf.eval()
    # from_pretrained keeps HF's `_keep_in_fp32_modules_strict` in float32 at bf16 / fp16; _from_config does not.
    # The norms among them are left in `dtype`: a float32 norm weight makes the next projection's input float32,
    # which its bf16 weight rejects in this HF version.
    if model.dtype in (torch.bfloat16, torch.float16):
        keep = [re.compile(rf"(^|\.){re.escape(k)}(\.|$)") for k in hf._keep_in_fp32_modules_strict or ()
                if "norm" not in k]
        for name, t in hf.named_parameters():
            if any(k.search(name) for k in keep):
                t.data = t.data.float()
    params = hf.state_dict(keep_vars=True)
    filled: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for name, src in our_tensors(model, model.dtype):
        key, index = hf_target(name, cfg.moe_inter_dim)
        if key not in params:
            raise RuntimeError(f"our tensor {name} maps to {key}, which HF's model does not have")
        if (key, repr(index)) in seen:
            raise RuntimeError(f"HF tensor {key}{list(index) or ''} has two sources (second: {name})")
        seen.add((key, repr(index)))
        dst = params[key][index] if index else params[key]
        if tuple(dst.shape) != tuple(src.shape):
            raise RuntimeError(f"HF tensor {key}{list(index) or ''}: shape {tuple(dst.shape)}, ours {name} "
                               f"{tuple(src.shape)}")
        dst.copy_(src)
        filled[key] = filled.get(key, 0) + src.numel()
    for key, t in params.items():
        if filled.get(key, 0) != t.numel():
            raise RuntimeError(f"HF tensor {key}: {filled.get(key, 0)} of {t.numel()} values filled from ours")
    return hf


@torch.no_grad()
def hf_agreement(model: Transformer, hf, prompt_len: int, steps: int) -> dict:
    """Logits of every prompt position and `steps` greedy continuations, ours (quantisation simulations off, as
    HF has no FP8-KV / FP4-indexer round trips) against HF's, both on the same dequantised weights."""
    cfg, dev = model.config, model.head.weight.device
    ids = torch.randint(2, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(dev)
    model.set_quant_sim(False)
    try:
        cache = model.new_cache(1, prompt_len + steps + 1)
        ours = [model(ids, cache, all_logits=True)[0]]
        out = hf(input_ids=ids, use_cache=True)
        theirs, pkv = [out.logits[0].float()], out.past_key_values
        ours_tok, theirs_tok = [ours[0][-1].argmax()], [theirs[0][-1].argmax()]
        for _ in range(steps):      # each model continues from its own greedy token
            ours.append(model(ours_tok[-1].view(1, 1), cache))
            out = hf(input_ids=theirs_tok[-1].view(1, 1), past_key_values=pkv, use_cache=True)
            theirs.append(out.logits[0].float())
            ours_tok.append(ours[-1][-1].argmax())
            theirs_tok.append(theirs[-1][-1].argmax())
    finally:
        model.set_quant_sim(cfg.quant_sim)
    a, b = ours[0], theirs[0]
    same = [bool(x == y) for x, y in zip(ours_tok, theirs_tok)]
    agree = same.index(False) if False in same else len(same)
    # decode steps whose input token was the same for both (every earlier greedy token agreed)
    decode = [float((x[-1] - y[-1]).abs().max()) for i, (x, y) in enumerate(zip(ours[1:], theirs[1:]), 1)
              if all(same[:i])]
    return {"prompt": prompt_len, "max_abs_diff": float((a - b).abs().max()),
            "decode_max_abs_diff": max(decode, default=None), **logit_gap(a, b),
            "cosine_min": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()),
            "greedy_agree": f"{agree}/{len(same)}"}


def oom_site(e: BaseException) -> str:
    """Where in HF's model an out-of-memory error was raised, and the allocation that failed."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "deepseek_v4" in f.filename] or \
        traceback.extract_tb(e.__traceback__)[-1:]
    size = re.search(r"Tried to allocate [0-9.]+ [KMGT]iB", str(e))
    where = f"{frames[-1].name}: {frames[-1].line}" if frames else "?"
    return where + (f"; t{size.group(0)[1:]}" if size else "")


@torch.no_grad()
def hf_decode(hf, device: Device, vocab: int, prompt_len: int, batch: int, steps: int, limit_s: float) -> dict:
    """HF greedy decode tokens/s: its forward over the batched prompt (prefill, eager attention), then one
    forward per token on its own cache, stopping after `steps` or once `limit_s` seconds of decode have run."""
    dev = device.torch_device
    ids = torch.randint(2, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    ids = ids.to(dev).expand(batch, -1)
    device.empty_cache()
    device.reset_peak()
    try:
        device.synchronize()
        t0 = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        device.synchronize()
        prefill_s = time.perf_counter() - t0
        pkv, tok = out.past_key_values, first_tokens(vocab, batch, prompt_len, dev)[:, None]
        del out
        tok = hf(input_ids=tok, past_key_values=pkv, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)  # warm-up
        done, t0 = 0, time.perf_counter()
        while done < steps:
            tok = hf(input_ids=tok, past_key_values=pkv, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            done += 1
            if done % 4 == 0:
                device.synchronize()
                if time.perf_counter() - t0 > limit_s:
                    break
        device.synchronize()
        decode_s = time.perf_counter() - t0
        return {"tok_s": batch * done / decode_s, "prefill_s": prefill_s, "steps": done,
                "peak_gib": device.memory().peak / 2**30}
    except torch.OutOfMemoryError as e:
        return {"skipped": f"OOM at prompt {prompt_len} batch {batch} ({oom_site(e)})", "oom": True}
    finally:
        pkv = out = None
        device.empty_cache()


def hf_baseline(model: Transformer, device: Device, prompts: list[int], batches: list[int], steps: int,
                limit_s: float) -> dict:
    """HF transformers' DeepseekV4ForCausalLM on our weights: logits agreement, then decode tokens/s per case.
    Returns {"skipped": why} when transformers lacks it or our weights do not map onto it."""
    try:
        import transformers
        from transformers import DeepseekV4ForCausalLM  # noqa: F401 -- only to know it is there
    except Exception as e:  # noqa: BLE001 -- not installed, or too old to have deepseek_v4
        return {"skipped": f"transformers without DeepseekV4ForCausalLM ({type(e).__name__})"}
    t0 = time.perf_counter()
    try:
        hf = build_hf_model(model, device)
    except Exception as e:  # noqa: BLE001 -- report why; our own measurements stand
        device.empty_cache()
        return {"skipped": f"could not build it on our weights: {type(e).__name__}: {str(e)[:300]}"}
    out = {"version": transformers.__version__, "build_s": time.perf_counter() - t0, "cases": {},
           "experts": str(getattr(hf.config, "_experts_implementation", None) or "eager")}
    try:
        out["agreement"] = hf_agreement(model, hf, min(64, min(prompts)), 4)
    except Exception as e:  # noqa: BLE001
        out["agreement"] = {"skipped": short_error(e, 160)}
    for pl in prompts:
        oom_at, per_seq_s = None, 0.0
        for b in sorted(batches):
            if oom_at is not None:      # a larger batch at the same prompt needs more: do not spend time on it
                out["cases"][f"{pl}x{b}"] = {"skipped": f"OOM at prompt {pl} batch {oom_at} (not tried at {b})"}
                continue
            if per_seq_s * b > 4 * limit_s:     # HF prefills every sequence of the batch: time grows with b
                out["cases"][f"{pl}x{b}"] = {"skipped": f"not tried: prefill predicted {per_seq_s * b:.0f} s "
                                                        f"(> {4 * limit_s:g} s) at prompt {pl} batch {b}"}
                continue
            try:
                r = hf_decode(hf, device, model.config.vocab_size, pl, b, steps, limit_s)
            except Exception as e:  # noqa: BLE001
                r = {"skipped": short_error(e, 120)}
            if r.pop("oom", False):
                oom_at = b
            per_seq_s = max(per_seq_s, r.get("prefill_s", 0.0) / b)
            out["cases"][f"{pl}x{b}"] = r
    del hf
    device.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: tiny width, 2 layers, short prompts")
    p.add_argument("--preset", default="flash", choices=["flash", "pro", "tiny"])
    p.add_argument("--layers", type=positive, default=4)
    p.add_argument("--prompts", type=positive, nargs="+", default=[1024, 65536])
    p.add_argument("--batches", type=positive, nargs="+", default=[1, 32])
    p.add_argument("--steps", type=positive, default=32)
    p.add_argument("--chunk", type=positive, default=4096, help="prefill chunk (tokens)")
    p.add_argument("--no-graph", "--no-graphs", dest="no_graph", action="store_true",
                   help="measure eager decode only (no graph capture)")
    p.add_argument("--moe", default="auto", choices=list(MOE_MODES),
                   help="MoE path: auto (static for decode / capture), static, or dynamic (eager only)")
    p.add_argument("--compile", action="store_true",
                   help="also time the decode step compiled by ascend.backends.cuda.compile_decode (then captured)")
    p.add_argument("--profile", type=non_negative, default=0, metavar="STEPS",
                   help="CUDA: profile this many replayed decode steps per case and print the top kernels")
    p.add_argument("--pick", default="table", choices=["table", "torch"],
                   help="greedy pick of the timed steps: the model's kernels.argmax (as the launcher; one Triton "
                        "launch on CUDA) or torch.argmax (the baseline before it)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--hf-limit", type=float, default=10.0,
                   help="seconds of HF decode per case at most (fewer steps are timed when it is slow)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.preset, args.layers, args.prompts, args.batches, args.steps, args.chunk = "tiny", 2, [64, 256], [1, 4], 4, 64
    device = get_device(args.device)
    dtype = compute_dtype(device.type)
    cfg = ModelConfig.preset(args.preset, n_layers=args.layers,
                             max_seq_len=max(max(args.prompts) + args.steps + 3, 1024))
    t0 = time.perf_counter()
    model = random_model(cfg, device, dtype)
    set_moe_mode(model, args.moe)
    build_s = time.perf_counter() - t0
    bandwidth = copy_bandwidth(device, 2**30 if device.type != "cpu" else 2**27)
    graphs = not args.no_graph and args.moe != "dynamic"
    pick = REFERENCE.argmax if args.pick == "torch" else None
    rows = [run_case(model, device, pl, b, args.steps, args.chunk, graphs, args.compile, args.profile, pick)
            for pl in args.prompts for b in args.batches]
    best = lambda r: max(r["eager_tok_s"], r["graph_tok_s"] or 0.0, r["compiled_tok_s"] or 0.0)  # noqa: E731
    for r in rows:
        r["roofline_tok_s"] = r["batch"] * bandwidth / r["bytes_per_step"]
        r["of_roofline"] = best(r) / r["roofline_tok_s"]
    hf = ({"skipped": "--no-hf"} if args.no_hf
          else hf_baseline(model, device, args.prompts, args.batches, args.steps, args.hf_limit))
    for r in rows:
        theirs = hf.get("cases", {}).get(f"{r['prompt']}x{r['batch']}", {})
        r["hf_tok_s"] = theirs.get("tok_s")
        r["hf_note"] = theirs.get("skipped", "")
        r["vs_hf"] = best(r) / r["hf_tok_s"] if r["hf_tok_s"] else None
    doc = {"device": str(device), "preset": args.preset, "layers": args.layers, "experts": cfg.n_routed_experts,
           "expert_dtype": cfg.expert_dtype, "dtype": str(dtype), "moe": args.moe, "pick": args.pick,
           "build_s": build_s, "copy_bandwidth_gb_s": bandwidth / 1e9, "cases": rows, "hf": hf}
    if args.json:
        print(json.dumps(doc))
        return
    print(f"{device}: {args.preset} width, {args.layers} layers, {cfg.n_routed_experts} experts ({cfg.expert_dtype}), "
          f"{dtype}, MoE {args.moe}, greedy pick {args.pick}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (measured); "
          f"model built in {build_s:.1f} s")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'prompt':>7} {'batch':>5} {'prefill tok/s':>13} {'eager tok/s':>11} {'graph tok/s':>11} "
          f"{'compiled tok/s':>14} {'step ms e/g/c':>19} {'MB/step':>8} {'roofline tok/s':>14} {'of roof':>7} "
          f"{'HF tok/s':>9} {'vs HF':>6} {'peak GiB':>8}  graph; compiled")
    for r in rows:
        steps_ms = "/".join(fmt(r[k], ".2f") for k in ("eager_step_ms", "graph_step_ms", "compiled_step_ms"))
        gap = r["compiled_vs_eager"]
        compiled = r["compiled"] + (f" in {r['compile_s']:.0f} s, logits vs eager: rel err {gap['rel_err']:.2g}, "
                                    f"argmax equal {gap['argmax_equal']:.0%}" if gap else "")
        print(f"{r['prompt']:>7} {r['batch']:>5} {r['prefill_tok_s']:>13.1f} {r['eager_tok_s']:>11.1f} "
              f"{fmt(r['graph_tok_s'], '.1f'):>11} {fmt(r['compiled_tok_s'], '.1f'):>14} {steps_ms:>19} "
              f"{r['bytes_per_step'] / 1e6:>8.1f} {r['roofline_tok_s']:>14.1f} {r['of_roofline']:>7.1%} "
              f"{fmt(r['hf_tok_s'], '.1f'):>9} {fmt(r['vs_hf'], '.2f'):>6} {r['peak_gib']:>8.2f}  {r['graph']}; "
              f"{compiled}" + (f"; HF: {r['hf_note']}" if r["hf_note"] else ""))
    print("roofline: (weights a step reads, routed experts by expected distinct use, + whole KV cache) / copy "
          "bandwidth; 'of roof' and 'vs HF' use the fastest of eager, graph and compiled")
    for r in rows:
        for key, what in (("profile", "captured"), ("compiled_profile", "compiled + captured")):
            if r.get(key):
                print(format_kernel_table(r[key], f"{what} step, prompt {r['prompt']} batch {r['batch']}"))
    if "skipped" in hf:
        print("HF transformers baseline: skipped: " + hf["skipped"])
        return
    print(f"HF transformers {hf['version']} baseline: DeepseekV4ForCausalLM built in memory on our weights "
          f"dequantised to {dtype} ({hf['build_s']:.1f} s), eager attention, experts '{hf['experts']}', its own "
          f"cache, greedy; decode timed "
          f"over <= {args.steps} steps or {args.hf_limit:g} s per case")
    for key, c in hf["cases"].items():
        print(f"  HF {key}: " + (c["skipped"] if "skipped" in c else
                                 f"{c['tok_s']:.1f} tok/s over {c['steps']} steps, prefill {c['prefill_s']:.2f} s, "
                                 f"peak {c['peak_gib']:.2f} GiB"))
    a = hf["agreement"]
    print("  logits agreement (ours with FP8-KV / FP4-indexer simulations off; same dequantised weights): " + (
        a["skipped"] if "skipped" in a else
        f"prompt {a['prompt']}: max |diff| {a['max_abs_diff']:.3g}, rel err {a['rel_err']:.3g}, min cosine "
        f"{a['cosine_min']:.6f}, argmax equal {a['argmax_equal']:.1%} of positions; greedy tokens agree "
        f"{a['greedy_agree']} steps, decode max |diff| {fmt(a['decode_max_abs_diff'], '.3g')}"))


if __name__ == "__main__":
    from ascend.cli import run_script
    run_script(main)   # user errors: one line, exit 2
