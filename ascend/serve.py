"""Serve DeepSeek-V4 on one rank of a torchrun job: the process `ascend run` starts on every rank.

    torchrun --nproc-per-node 2 -m ascend.serve --ckpt OUT --input prompts.jsonl [--json]
    torchrun --nproc-per-node 2 scripts/launch.py --ckpt OUT --interactive      # the same, from a checkout

It lives in the package, not in scripts/, so that an installed ascend-deploy runs it (`ascend run` starts it with
torchrun's `-m`); scripts/launch.py is its script form.

Every rank checks the converted checkpoint's manifest and plan against the launched world before
any weight is read, joins the dp x tp x ep mesh, and loads only its own shard. Rank 0 reads the
requests and shares them; each data-parallel group serves every dp-th request; rank 0 streams its
own group's text and prints every request's result with TTFT, TPOT and tokens/s at the end.

A failing rank prints `rank N: <message>` on stderr and leaves at once with status 2 (an error the
toolkit names: bad checkpoint, plan or input) or 1 (anything else, with its traceback), without
waiting on peers that may be blocked in a collective; torchrun then stops the other ranks. The
collective timeout (--dist-timeout) is the backstop when no launcher watches the processes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from ascend import dist as mesh_lib
from ascend.argtypes import arg_type, new_file, positive, positive_seconds
from ascend.errors import AscendDeployError
from ascend.launch import (LaunchError, Lockstep, Request, check_checkpoint, check_lengths, generate,
                           idle_until_done, read_requests, split_for_dp, summary)
from model.generate import SamplingParams
from model.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None, prog: str = "python -m ascend.serve") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, type=Path, help="converted checkpoint directory (ascend convert --out)")
    p.add_argument("--plan", type=Path, help="plan.json to enforce (default: the one in --ckpt)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json or its directory (default: --ckpt)")
    p.add_argument("--device", default=os.environ.get("ASCEND_DEVICE", "auto"), choices=["auto", "npu", "cuda", "cpu"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", type=Path, help="requests: .jsonl (chat messages per line) or text (a prompt per line)")
    src.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    src.add_argument("--interactive", action="store_true", help="chat on stdin (/exit, /clear, /tool RESULT)")
    p.add_argument("--system", help="system prompt for --prompt and --interactive")
    p.add_argument("--mode", default="chat", choices=["chat", "thinking"], help="V4 chat or thinking mode")
    p.add_argument("--max-new-tokens", type=positive, default=128)
    p.add_argument("--max-len", type=positive, default=4096,
                   help="context length to allocate per sequence (with captured all-to-all decode: allocated for "
                        "--max-batch sequences at start)")
    p.add_argument("--max-batch", type=positive, default=8, help="requests per batch on one data-parallel group")
    p.add_argument("--prefill-chunk", type=positive, help="prefill long prompts in chunks of this many tokens")
    p.add_argument("--temperature", type=arg_type(float, math.isfinite, "a finite number"), default=0.0,
                   help="<= 0: greedy")
    p.add_argument("--top-p", type=arg_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=1.0)
    p.add_argument("--top-k", type=arg_type(int, lambda v: v >= 0, "an integer >= 0 (0: off)"), default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string or special token (repeatable)")
    p.add_argument("--moe-exchange", choices=["auto", "alltoall", "allgather", "allreduce"], default="auto",
                   help="expert exchange; auto: the plan's setting, else all-to-all when an ep group spans "
                        "data-parallel groups and the all-reduce combine otherwise")
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--no-graph", action="store_true",
                       help="decode eagerly (default on CUDA: replay captured graphs, batch padded to 1/2/4/.../32)")
    graph.add_argument("--graph", action="store_true",
                       help="capture decode also where it is not the default: NPUGraph on NPUs (never run on one)")
    p.add_argument("--act-quant", action="store_true",
                   help="round the inputs of fp8 / fp4 projections to FP8 per 128 first, as DeepSeek's own inference "
                        "code does (its numerics; default: the plain bf16 inputs that HF transformers multiplies)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: capture the decode step compiled by torch.compile (inductor; tens of seconds per batch "
                        "bucket at start, then fewer, fused kernels per token)")
    p.add_argument("--no-stream", action="store_true", help="print each reply when complete")
    p.add_argument("--json", action="store_true", help="print one JSON document (results, timings) on rank 0")
    p.add_argument("--save", type=new_file, help="also write that JSON document to this file")
    p.add_argument("--dump-logits", action="store_true", help=argparse.SUPPRESS)  # parity tests
    p.add_argument("--dist-timeout", type=positive_seconds,
                   default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--inject-failure", help=argparse.SUPPRESS)  # "RANK:load|generate", for failure tests
    return p.parse_args(argv)


def log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, file=sys.stderr, flush=True)


def maybe_fail(args: argparse.Namespace, rank: int, stage: str) -> None:
    if args.inject_failure == f"{rank}:{stage}":
        raise RuntimeError(f"injected failure at {stage}")


def share(obj, rank: int, group=None):
    """Rank 0's object on every rank (of `group`, default all)."""
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def read_line(prompt: str) -> str:
    """A line from stdin; the end of input ends the chat like /exit."""
    try:
        return input(prompt)
    except EOFError:
        print()
        return "/exit"


def gather_results(completions: list[tuple[int, dict]], mesh) -> list[dict]:
    """Every data-parallel group's (request index, result) on rank 0, in request order."""
    mine = completions if mesh.tp_rank == 0 else []
    if not mesh.distributed:
        return [d for _, d in sorted(mine, key=lambda x: x[0])]
    parts = [None] * mesh.world_size if mesh.rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if mesh.rank != 0:
        return []
    return [d for _, d in sorted((x for part in parts for x in part), key=lambda x: x[0])]


def print_table(results: list[dict], total: dict) -> None:
    print(f"\n{'id':>6} {'prompt':>7} {'output':>7} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>8}  finish")
    for r in results:
        tpot = "-" if r["tpot_s"] is None else f"{r['tpot_s'] * 1e3:.1f}"     # one token: no time per next token
        print(f"{r['id']:>6} {r['prompt_tokens']:>7} {r['completion_tokens']:>7} {r['ttft_s'] * 1e3:>9.1f} "
              f"{tpot:>9} {r['tokens_per_s']:>8.1f}  {r['finish_reason']}")
    print(f"{total['requests']} requests, {total['completion_tokens']} tokens in {total['wall_s']:.2f} s: "
          f"{total['tokens_per_s']:.1f} tokens/s")


def batch_seed(seed: int, k: int) -> int:
    """The sampling seed of batch k of a run with --seed `seed`: the pair hashed into 63 bits (BLAKE2b), so each
    (seed, k) has a stream of its own (seed + k gave batch k + 1 of seed s the stream of batch k of seed s + 1)."""
    return int.from_bytes(hashlib.blake2b(f"{seed},{k}".encode(), digest_size=8).digest(), "little") >> 1


def serve_batches(args, mesh, session, idle, tokenizer, requests: list[Request], lockstep, stream: bool,
                  batches_before: int = 0) -> list[dict]:
    """All requests over the data-parallel groups; returns (on rank 0) every result in request order. Batch k of
    the run (in round-robin order over the groups, after `batches_before` of earlier calls) samples with
    `batch_seed(seed, k)`: one seed for every batch gave request i of each batch, or each chat turn, the same random
    stream."""
    arrived = time.perf_counter()     # every request is submitted at once: TTFT includes waiting for a batch
    index = {id(r): i for i, r in enumerate(requests)}
    batches = split_for_dp(requests, mesh.dp_size, mesh.dp_rank, args.max_batch)
    rounds = max(len(split_for_dp(requests, mesh.dp_size, d, args.max_batch)) for d in range(mesh.dp_size))
    done: list[tuple[int, dict]] = []
    for r in range(rounds):
        if r >= len(batches):  # this group has no batch this round
            idle_until_done(idle, lockstep, tokenizer.bos_id, session)
            continue
        batch = batches[r]
        show = stream and mesh.rank == 0 and len(batch) == 1
        on_text = (lambda i, delta: print(delta, end="", flush=True)) if show else None
        maybe_fail(args, mesh.rank, "generate")
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  seed=batch_seed(args.seed, batches_before + r * mesh.dp_size + mesh.dp_rank))
        out = generate(session, tokenizer, batch, sampling, args.max_new_tokens, args.max_len, args.stop, lockstep,
                       idle, on_text, keep_logits=args.dump_logits, arrived=arrived)
        if show:
            print()
        done += [(index[id(c.request)], c.to_dict()) for c in out]
        if stream and mesh.rank == 0 and not show:
            for c in out:
                print(f"[{c.request.id}] {c.text}", flush=True)
    return gather_results(done, mesh)


def interactive(args, mesh, session, idle, tokenizer, lockstep) -> None:
    """A chat on rank 0's stdin; every rank follows the same conversation (dp group 0 serves it)."""
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    # the other ranks wait for the user's next line here: on a group of their own with no practical timeout, as
    # --dist-timeout (a stuck collective's bound) must not end a chat whose user is thinking
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30)) if dist.is_initialized() else None
    for turn in itertools.count():
        line = share(read_line(">>> ") if mesh.rank == 0 else None, mesh.rank, waiting)
        if line == "/exit":
            return
        if line == "/clear":
            messages = messages[:1] if args.system else []
            continue
        if line.startswith("/tool "):  # a tool result for the last tool call(s)
            messages.append({"role": "tool", "content": line[len("/tool "):]})
        else:
            messages.append({"role": "user", "content": line})
        request = Request("chat", list(messages), mode=args.mode)
        # a conversation outgrowing --max-len is told so and kept (rank 0 decides for all: no rank may fail alone)
        length = share(len(tokenizer.encode(request.prompt())) if mesh.rank == 0 else None, mesh.rank)
        if length + args.max_new_tokens > args.max_len:
            log(mesh.rank, f"(the conversation, {length} tokens plus --max-new-tokens {args.max_new_tokens}, exceeds "
                           f"--max-len {args.max_len}: /clear to start over; that line was not sent)")
            messages.pop()
            continue
        results = serve_batches(args, mesh, session, idle, tokenizer, [request], lockstep, stream=True,
                                batches_before=turn * mesh.dp_size)
        # the parsed reply, and its tokens for the plain-text fallback (not the whole result: it may hold logits)
        reply, tokens = share((results[0]["message"], results[0]["tokens"]) if mesh.rank == 0 else None, mesh.rank)
        if reply.get("tool_calls") and mesh.rank == 0:
            print(json.dumps(reply["tool_calls"], ensure_ascii=False, indent=1))
        if "parse_error" in reply:  # e.g. cut off by --max-new-tokens: keep the raw text as the reply
            log(mesh.rank, f"(reply kept as plain text: {reply['parse_error']})")
            reply = {"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)}
        messages.append(reply)


def serve(args: argparse.Namespace, env: mesh_lib.LaunchEnv) -> int:
    from ascend.model_session import build_session  # heavy imports after the cheap checks

    t0 = time.perf_counter()
    checked = check_checkpoint(args.ckpt, env.rank, env.world_size, args.plan, act_quant=args.act_quant)
    plan = checked.plan
    log(env.rank, f"[launch] {env.world_size} ranks: dp {plan.dp} x tp {plan.tp}, ep {plan.ep} with "
                  f"{plan.redundant} redundant expert slots; manifest and plan match")
    requests = None
    if env.rank == 0 and not args.interactive:
        requests = (read_requests(args.input, args.mode) if args.input else
                    [Request(str(i), ([{"role": "system", "content": args.system}] if args.system else [])
                             + [{"role": "user", "content": p}], mode=args.mode)
                     for i, p in enumerate(args.prompt or ["Hello! Who are you?"])])
    tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
    if tokenizer.vocab_size > checked.config.vocab_size:
        raise LaunchError(f"{args.tokenizer or args.ckpt}: the tokenizer has {tokenizer.vocab_size} ids, the model's "
                          f"vocabulary {checked.config.vocab_size}; give the checkpoint's own tokenizer.json")
    if requests is not None:
        check_lengths(requests, tokenizer, args.max_new_tokens, args.max_len, str(args.input or "--prompt"))
    mesh = mesh_lib.init(tp=plan.tp, ep=plan.ep, device=args.device, timeout_s=args.dist_timeout)
    maybe_fail(args, mesh.rank, "load")
    session, idle, exchange = build_session(args.ckpt, checked, mesh, args.moe_exchange, args.prefill_chunk,
                                            graphs=False if args.no_graph else True if args.graph else None,
                                            compile=args.compile,
                                            max_batch=args.max_batch, max_len=args.max_len)
    if mesh.distributed:  # everyone loaded: a failed load has ended its rank (and the job) before this
        dist.barrier()
    log(env.rank, f"[launch] rank shards loaded in {time.perf_counter() - t0:.1f} s on "
                  f"{mesh.device.collective_backend if mesh.distributed else mesh.device.type}; expert exchange: "
                  f"{exchange}; decode {'graphs' if session.graphs is not None else 'eager'}"
                  f"{' (compiled)' if session.compile else ''}")
    lockstep = Lockstep(mesh.tp_group, mesh.dp_rank * mesh.tp_size, mesh.tp_size,
                        world=mesh.distributed and mesh.dp_size > 1, device=mesh.device.torch_device)
    if args.interactive:
        interactive(args, mesh, session, idle, tokenizer, lockstep)
    else:
        requests = share(requests, env.rank)
        t1 = time.perf_counter()
        results = serve_batches(args, mesh, session, idle, tokenizer, requests, lockstep,
                                stream=not (args.json or args.no_stream))
        if env.rank == 0:
            total = summary(results, time.perf_counter() - t1)
            doc = {"world_size": env.world_size, "dp": plan.dp, "tp": plan.tp, "ep": plan.ep,
                   "redundant_experts": plan.redundant, "expert_exchange": exchange,
                   "results": results, "summary": total}
            if args.json:
                print(json.dumps(doc, ensure_ascii=False))
            else:
                print_table(results, total)
            if args.save:       # after printing: a failed write does not lose what the run produced
                args.save.write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    shut_down(mesh, captured_collectives=mesh.distributed and session.graphs is not None)
    return 0


def shut_down(mesh: mesh_lib.Mesh, captured_collectives: bool) -> None:
    """Every rank waits for the others, then the process groups are destroyed, except after decode graphs that hold
    collectives were captured: with those graphs still held (the session is alive here), NCCL's communicator
    teardown did not return (pytorch/pytorch#115388; every such 2-rank job on 2 H200 hung after its last token,
    until killed, while scripts/bench_multi_gpu.py, whose sessions are gone by its teardown, exited). The process
    exits right after this (`main`'s os._exit), which releases the communicators with it."""
    if mesh.distributed:
        mesh.device.synchronize()
        dist.barrier()
    if not captured_collectives:
        mesh.destroy()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = mesh_lib.LaunchEnv.from_env()
    try:
        code = serve(args, env)
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as e:  # noqa: BLE001 -- every failure must end this rank, loudly and at once
        detail = str(e) if isinstance(e, AscendDeployError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, AscendDeployError):
            traceback.print_exc()
        print(f"rank {env.rank}: {detail}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2 if isinstance(e, AscendDeployError) else 1)  # no teardown: peers may be stuck in a collective
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
