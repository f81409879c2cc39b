"""One rank of the inference job: check the checkpoint, join the mesh, load this rank's shard, serve requests.

ascend/serve.py drives these pieces under torchrun (argument parsing, printing, failing loudly);
everything here is plain functions and small classes so each piece is testable on its own.

Layout (the plan): world = dp x tp; the tp ranks of one data-parallel group split attention heads,
indexer heads and the grouped output projection, and serve the same prompts; different dp groups
serve different prompts. Routed experts are spread over ep ranks with the plan's redundant
replicas; when an expert-parallel group spans several dp groups, tokens travel to their experts
through `ascend.expert_parallel` (all-to-all, or all-gather + reduce-scatter), and every rank must
run the same number of forward steps: a rank with nothing left to do runs a one-token idle step.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from ascend.errors import AscendDeployError, parse_json
from model.chat import ChatFormatError, encode_messages, parse_completion
from model.generate import Sampler, SamplingParams
from model.kernels import Kernels
from model.tokenizer import EOS, Tokenizer


class LaunchError(AscendDeployError):
    """The checkpoint, plan, request file or options cannot serve this launch."""


# ============================================================================================ requests
@dataclass
class Request:
    """One conversation to continue: OpenAI-style messages (+ tools), how to render it, how long to generate."""

    id: str
    messages: list[dict]
    tools: list[dict] | None = None
    mode: str = "chat"
    max_new_tokens: int | None = None

    def prompt(self) -> str:
        """The conversation rendered with V4's chat template."""
        return self._rendered

    @functools.cached_property
    def _rendered(self) -> str:
        # a request is rendered when it is read (to refuse a bad one), measured and generated: once is enough
        messages = [dict(m) for m in self.messages]
        if self.tools:
            if not (messages and messages[0]["role"] == "system"):
                messages.insert(0, {"role": "system", "content": ""})
            messages[0]["tools"] = self.tools
        return encode_messages(messages, self.mode)


def _request_from_json(obj: Any, where: str, default_mode: str) -> Request:
    if isinstance(obj, str):
        obj = {"messages": [{"role": "user", "content": obj}]}
    elif isinstance(obj, list):
        obj = {"messages": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise LaunchError(f"{where}: expected a JSON object with a non-empty \"messages\" list, a list of "
                          f"messages, or a string")
    mode = obj.get("mode", default_mode)
    if mode not in ("chat", "thinking"):
        raise LaunchError(f"{where}: \"mode\" is {mode!r}, expected \"chat\" or \"thinking\"")
    max_new = obj.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or max_new < 1):
        raise LaunchError(f"{where}: \"max_new_tokens\" is {max_new!r}, expected a positive integer")
    request = Request(str(obj.get("id", "")), obj["messages"], obj.get("tools"), mode, max_new)
    try:  # the chat template is what reads the messages: a request it cannot render is refused here, by line
        request.prompt()
    except ChatFormatError as e:
        raise LaunchError(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise LaunchError(f"{where}: messages or tools not in the OpenAI chat format "
                          f"({type(e).__name__}: {e})") from None
    return request


def read_requests(path: str | Path, mode: str = "chat") -> list[Request]:
    """Requests from a .jsonl/.json file (one request per line) or a text file (one user prompt per line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"{path}: cannot read the request file ({type(e).__name__}: {e})") from None
    as_json = path.suffix in (".jsonl", ".json")
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if as_json:
            try:
                obj = parse_json(line)
            except ValueError as e:
                raise LaunchError(f"{path}:{n}: not JSON ({getattr(e, 'msg', e)}); expected one request per "
                                  f"line") from None
        else:
            obj = line
        req = _request_from_json(obj, f"{path}:{n}", mode)
        req.id = req.id or str(len(requests))
        requests.append(req)
    if not requests:
        raise LaunchError(f"{path}: no requests (empty file)")
    return requests


# ============================================================================================ checks
@dataclass
class Checked:
    """What a rank may rely on once `check_checkpoint` passed."""

    manifest: dict
    plan: Any            # ascend.planner.plan.Plan
    config: Any          # model.config.ModelConfig


def check_checkpoint(ckpt: str | Path, rank: int, world_size: int, plan_path: str | Path | None = None,
                     act_quant: bool = False) -> Checked:
    """Refuse a launch whose plan, shards or world size disagree, before any weight is read. `act_quant`: the
    model config asks for the FP8 activation rounding (`ascend run --act-quant`), validated like any field."""
    from ascend.planner.plan import Plan
    from convert.manifest import rank_entry, read_manifest
    from model.config import ModelConfig

    ckpt = Path(ckpt)
    try:
        manifest = read_manifest(ckpt)
    except AscendDeployError as e:
        raise LaunchError(str(e)) from None
    where = ckpt / "manifest.json"
    if manifest.get("world_size") != world_size:
        raise LaunchError(f"{where}: shards are for {manifest.get('world_size')} ranks but {world_size} were "
                          f"launched; launch {manifest.get('world_size')} processes or convert for {world_size}")
    plan_path = Path(plan_path) if plan_path else ckpt / "plan.json"
    plan = Plan.load(plan_path)
    if not plan.same_as(manifest.get("plan"), str(where)):
        raise LaunchError(f"{plan_path}: differs from the plan the shards in {ckpt} were converted with; "
                          f"convert again with this plan, or launch with {ckpt / 'plan.json'}")
    if plan.world_size != world_size:
        raise LaunchError(f"{plan_path}: plan is for {plan.world_size} ranks, {world_size} launched")
    entry = rank_entry(manifest, rank, str(where))
    for rel, meta in entry["files"].items():
        path = ckpt / rel
        size = path.stat().st_size if path.is_file() else None
        if size != meta.get("bytes"):
            raise LaunchError(f"{path}: rank {rank} shard {'missing' if size is None else f'has {size} bytes'}, "
                              f"manifest says {meta.get('bytes')} bytes (run `ascend verify {ckpt}`)")
    config = ModelConfig.from_hf(manifest["config"], act_quant=act_quant)
    if (config.n_layers, config.n_routed_experts) != (plan.n_layers, plan.n_routed_experts):
        raise LaunchError(f"{where}: config has {config.n_layers} layers / {config.n_routed_experts} experts, "
                          f"plan {plan.n_layers} / {plan.n_routed_experts}")
    return Checked(manifest, plan, config)


# ============================================================================================ generation
@dataclass
class Completion:
    """A finished request: tokens, text, parsed message and timings (seconds)."""

    request: Request
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    ttft_s: float = 0.0
    total_s: float = 0.0
    logits: list[list[float]] | None = None  # per generated token, only when asked (tests compare ranks)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a reply of one token (it has no such time)."""
        return (self.total_s - self.ttft_s) / (len(self.tokens) - 1) if len(self.tokens) > 1 else None

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s > 0 else 0.0

    def message(self) -> dict:
        """The reply parsed as a V4 assistant message (tool calls as OpenAI JSON), or why it does not parse. A
        reply ended by a stop string or stop token is complete as it stands, as if EOS followed."""
        text = self.text
        if self.finish_reason == "stop" and not text.endswith(EOS):
            text += EOS
        try:
            return parse_completion(text, self.request.mode)
        except ChatFormatError as e:
            return {"role": "assistant", "content": None, "parse_error": str(e)}

    def to_dict(self) -> dict:
        d = {"id": self.request.id, "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
             "tokens": self.tokens, "text": self.text, "message": self.message(),
             "finish_reason": self.finish_reason, "ttft_s": round(self.ttft_s, 6),
             "tpot_s": None if self.tpot_s is None else round(self.tpot_s, 6),
             "tokens_per_s": round(self.tokens_per_s, 3)}
        if self.logits is not None:
            d["logits"] = self.logits
        return d


class Session(Protocol):
    """The model on this rank with its own cache. `prefill` starts a batch (one sequence per prompt, room for
    `max_len` tokens each) and returns the float logits [B, V] after each prompt; `decode(tokens [B], active [B])`
    appends one token to each active sequence (inactive ones do not move) and returns logits [B, V].
    `replay_bucket()`: the captured graph this batch's decode would replay (0: none); `decode(bucket=)` takes the
    ranks' choice (`Lockstep.vote`), which binds sessions whose graphs exchange tokens (0: eagerly).
    `can_replay_idle()` / `replay_idle(bucket)`: whether a rank with nothing to decode can step the others' graph
    with no live row, and doing so. `kernels`: the model's `model.kernels.Kernels`, whose argmax the sampler picks
    with."""

    kernels: Kernels

    def prefill(self, prompts: list[list[int]], max_len: int) -> torch.Tensor: ...
    def replay_bucket(self) -> int: ...
    def decode(self, tokens: torch.Tensor, active: torch.Tensor, bucket: int | None = None) -> torch.Tensor: ...
    def can_replay_idle(self) -> bool: ...
    def replay_idle(self, bucket: int) -> None: ...


@dataclass
class Lockstep:
    """Keeps forward calls paired across ranks whose expert exchange spans data-parallel groups.

    `tp_group`/`tp_src`: ranks serving the same prompts take rank tp_src's sampled tokens, so they never
    diverge. `world`: when set, every step asks all ranks whether anyone still generates, and which decode graph
    all of them can replay next (their graphs exchange tokens, so all replay the same one or none).
    """

    tp_group: Any = None
    tp_src: int = 0
    tp_size: int = 1
    world: bool = False
    device: Any = None  # where collective tensors live (the accelerator for nccl / hccl)

    def same_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.broadcast(tokens, self.tp_src, group=self.tp_group)
        return tokens

    def vote(self, busy: bool, bucket: int = 0, idle_replays: bool = False) -> tuple[bool, int]:
        """(anyone still generating, the graph bucket every rank replays next or 0: all step eagerly).

        A busy rank gives the bucket its batch needs (0: it has no graph); an idle one whether it can replay any
        bucket with no live row (`idle_replays`). Ranks replay the largest bucket any busy one needs, which holds
        every batch as all captured the same buckets; one rank that cannot replay makes all step eagerly."""
        need = bucket if busy else 0
        if not self.world:
            return busy, need
        floor = need if busy else _ANY_BUCKET if idle_replays else 0
        flags = torch.tensor([int(busy), need, -floor], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        anyone, largest, negated_smallest = flags.tolist()
        return bool(anyone), largest if negated_smallest < 0 else 0


_ANY_BUCKET = 1 << 30       # an idle rank's vote that does not lower the smallest bucket


def idle_until_done(idle: Session, lockstep: Lockstep, bos: int, graphs: Session | None = None,
                    bucket: int = 0) -> None:
    """A rank with no prompts left keeps stepping while other data-parallel groups generate: one BOS token
    eagerly, or, when the ranks voted a graph (`bucket`), that graph of `graphs` replayed with no live row, so
    the others need not drop to eager decode.

    Every rank runs the same sequence, forward then vote, so the expert exchanges inside the forwards pair up.
    """
    replays = graphs is not None and graphs.can_replay_idle()
    while True:
        if bucket:
            graphs.replay_idle(bucket)
        else:
            idle.prefill([[bos]], 2)
        anyone, bucket = lockstep.vote(False, 0, replays)
        if not anyone:
            return


class Detokenizer:
    """A completion's text, grown token by token at a cost independent of its length.

    Each step decodes only the last few tokens twice, with and without the newest one, and appends the
    difference: the shared leading tokens give both decodes the same context (a decoder may treat the first token
    specially, e.g. drop a leading space), and a tail that ends inside a UTF-8 character (byte-level BPE splits
    characters over tokens) waits for the next token, so the pieces are whole characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0     # ids[prefix:read]: context already returned; ids[read:]: not yet

    def push(self, token: int, final: bool = False) -> str:
        """Add a token; returns the text added (empty while a character is incomplete, unless `final`)."""
        self.ids.append(token)
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") and not final:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(seen):]


def check_lengths(requests: list[Request], tokenizer: Tokenizer, max_new_tokens: int, max_len: int,
                  where: str) -> None:
    """Refuse, before anything is generated, a request whose prompt plus new tokens outgrows the context (found
    by its batch, it ended the run and lost the batches already done)."""
    for n, r in enumerate(requests, 1):
        tokens, new = len(tokenizer.encode(r.prompt())), r.max_new_tokens or max_new_tokens
        if tokens + new > max_len:
            raise LaunchError(f"{where}: request {n} ({r.id}): a prompt of {tokens} tokens plus {new} new tokens "
                              f"exceeds the context {max_len} (lower --max-new-tokens or raise --max-len)")


def generate(session: Session, tokenizer: Tokenizer, requests: list[Request], sampling: SamplingParams,
             max_new_tokens: int, max_len: int, stop: Iterable[str] = (), lockstep: Lockstep | None = None,
             idle: Session | None = None, on_text: Callable[[int, str], None] | None = None,
             keep_logits: bool = False, arrived: float | None = None) -> list[Completion]:
    """Generate for one batch of requests: prefill all prompts at once, then one token per step.

    A request ends at EOS, at a stop string or token, or after its max new tokens. `on_text(i, delta)`
    receives request i's text as it grows (only whole characters). With `lockstep.world`, the loop keeps
    stepping `idle` after this batch is done while any other rank still generates. Times count from `arrived`
    (`time.perf_counter()` when the requests were submitted; default now), so a batch that waited behind others
    reports that wait in its TTFT.
    """
    lockstep = lockstep or Lockstep()
    stop = [s for s in stop if s]  # matched in the text too: a vocabulary entry can also arrive inside longer tokens
    stop_ids = {tokenizer.eos_id} | {i for s in stop if (i := tokenizer.token_id(s)) is not None}
    prompts = [tokenizer.encode(r.prompt()) for r in requests]
    limits = [r.max_new_tokens or max_new_tokens for r in requests]
    longest = max(len(p) + n for p, n in zip(prompts, limits))
    if longest > max_len:
        raise LaunchError(f"a prompt of {max(map(len, prompts))} tokens plus {max(limits)} new tokens exceeds "
                          f"the context {max_len} (lower --max-new-tokens or raise --max-len)")
    B = len(requests)
    done = [Completion(r, len(p)) for r, p in zip(requests, prompts)]
    texts = [Detokenizer(tokenizer) for _ in requests]
    finished = [False] * B
    shown = [0] * B
    sampler = Sampler(sampling, session.kernels)
    eos_text = tokenizer.decode([tokenizer.eos_id])
    hold = max(map(len, stop), default=1) - 1  # a stop string may be arriving: do not stream its start yet
    t0 = time.perf_counter() if arrived is None else arrived
    logits = session.prefill(prompts, longest)
    while True:
        nxt = lockstep.same_tokens(sampler(logits))
        # one transfer with the tokens: whether each row's logits were all finite (NaN logits give no token)
        toks, finite = torch.stack((nxt, torch.isfinite(logits).all(dim=-1).to(nxt.dtype))).tolist()
        now = time.perf_counter() - t0      # after the transfer, which waits for the step that made the tokens
        for i, tok in enumerate(toks):
            if finished[i]:
                continue
            c = done[i]
            if not finite[i]:
                raise LaunchError(f"request {c.request.id}: the model's logits hold NaN or infinite values at output "
                                  f"token {len(c.tokens) + 1} (overflowing activations or corrupt weights: "
                                  f"`ascend verify` checks the checkpoint against its manifest)")
            if not c.tokens:
                c.ttft_s = now
            c.tokens.append(tok)
            if keep_logits:
                c.logits = c.logits or []
                c.logits.append(logits[i].float().cpu().tolist())
            c.total_s = now
            before = len(c.text)
            last = tok in stop_ids or len(c.tokens) >= limits[i]
            c.text += texts[i].push(tok, final=last)
            # a stop string can only end in the added text: search from where it could have started, and not
            # inside the EOS marker itself ("end" would cut the reply in the middle of it)
            at = max(0, before - hold)
            eos = tok == tokenizer.eos_id and c.text.endswith(eos_text)
            body = c.text[:len(c.text) - len(eos_text)] if eos else c.text
            hit = min((j for s in stop if (j := body.find(s, at)) >= 0), default=None)
            if tok in stop_ids or hit is not None:
                c.finish_reason = "stop"
                finished[i] = True
                if hit is not None:
                    c.text = c.text[:hit]
            elif last:
                finished[i] = True
            if on_text is not None:
                if finished[i]:
                    end = len(c.text) - (len(eos_text) if c.text.endswith(eos_text) else 0)
                else:  # not what may be the start of a stop string (the text holds whole characters only)
                    end = len(c.text) - hold
                if end > shown[i]:          # only the new part is sliced: streaming stays linear
                    on_text(i, c.text[shown[i]:end])
                    shown[i] = end
        anyone, bucket = lockstep.vote(not all(finished), session.replay_bucket(), session.can_replay_idle())
        if not anyone:
            break
        if all(finished):  # others still generate: keep their collectives paired
            idle_until_done(idle or session, lockstep, tokenizer.bos_id, session, bucket)
            break
        logits = session.decode(nxt, torch.tensor([not f for f in finished], device=nxt.device), bucket)
    return done


def split_for_dp(requests: list[Request], dp: int, dp_rank: int, max_batch: int) -> list[list[Request]]:
    """This data-parallel group's requests (every dp-th, round robin), in batches of at most max_batch."""
    mine = requests[dp_rank::dp]
    return [mine[i:i + max_batch] for i in range(0, len(mine), max_batch)]


def summary(results: list[dict], wall_s: float) -> dict:
    """Aggregate throughput and latency over the result dicts (`Completion.to_dict`) of a run."""
    n = sum(r["completion_tokens"] for r in results)

    def mean(key: str) -> float | None:         # over the requests that have the figure (TPOT: 2 tokens or more)
        values = [r[key] for r in results if r[key] is not None]
        return round(sum(values) / len(values), 6) if values else None
    return {"requests": len(results), "completion_tokens": n, "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "wall_s": round(wall_s, 6), "tokens_per_s": round(n / wall_s, 3) if wall_s > 0 else 0.0,
            "mean_ttft_s": mean("ttft_s"), "mean_tpot_s": mean("tpot_s")}
