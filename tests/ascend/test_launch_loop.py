"""ascend/launch.py: request files, the generation loop (with a toy model), dp split. Named apart from tests/scripts/test_launch.py (pytest needs unique basenames)."""

import json
import time

import pytest
import torch

from ascend import launch
from model.chat import encode_messages
from model.generate import SamplingParams
from model.kernels import REFERENCE
from model.tokenizer import load_tokenizer, write_synthetic_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_synthetic_tokenizer(tmp_path_factory.mktemp("tok"), 512))


class ToySession:
    """A deterministic stand-in model with per-row state: next token = f(last token, row length)."""

    kernels = REFERENCE

    def __init__(self, vocab: int, eos_at: int | None = None, eos: int = 1):
        self.vocab, self.eos_at, self.eos = vocab, eos_at, eos

    def prefill(self, prompts, max_len):
        self.length = torch.zeros(len(prompts), dtype=torch.long)
        self.max_len = max_len
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        return self.forward(ids, torch.tensor([len(p) for p in prompts]))

    def replay_bucket(self):
        return 0

    def can_replay_idle(self):
        return False

    def decode(self, tokens, active, bucket=None):
        return self.forward(tokens[:, None], active.long())

    def forward(self, ids, n_valid):
        self.length += n_valid
        assert int(self.length.max()) <= self.max_len
        last = ids[torch.arange(len(ids)), n_valid - 1]
        nxt = (last * 31 + self.length * 7) % (self.vocab - 40) + 40  # plain (non-special) tokens
        if self.eos_at is not None:
            nxt = torch.where(self.length >= self.eos_at, self.eos, nxt)
        return torch.nn.functional.one_hot(nxt, self.vocab).float()


def test_batched_equals_one_at_a_time(tok):
    reqs = [launch.Request(str(i), [{"role": "user", "content": "hi " * (i * 3 + 1)}]) for i in range(3)]
    kw = dict(sampling=SamplingParams(), max_new_tokens=6, max_len=128)
    together = launch.generate(ToySession(tok.vocab_size), tok, reqs, **kw)
    alone = [launch.generate(ToySession(tok.vocab_size), tok, [r], **kw)[0] for r in reqs]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert all(len(c.tokens) == 6 and c.finish_reason == "length" for c in together)
    assert len({tuple(c.tokens) for c in together}) == 3


def test_eos_stop_string_and_streaming(tok):
    req = launch.Request("a", [{"role": "user", "content": "hello"}], max_new_tokens=50)
    prompt_len = len(tok.encode(req.prompt()))
    deltas = []
    [c] = launch.generate(ToySession(tok.vocab_size, eos_at=prompt_len + 5), tok, [req], SamplingParams(), 50, 128,
                          on_text=lambda i, d: deltas.append(d))
    assert c.finish_reason == "stop" and c.tokens[-1] == tok.eos_id and len(c.tokens) == 6
    assert c.text == tok.decode(c.tokens) and "".join(deltas) + "<｜end▁of▁sentence｜>" == c.text
    assert c.ttft_s > 0 and c.total_s >= c.ttft_s and c.tokens_per_s > 0
    free = launch.generate(ToySession(tok.vocab_size), tok, [req], SamplingParams(), 12, 128)[0].text
    stop = free[4:6]  # a two-character stop string: its first character must not be streamed early
    streamed = []
    [s] = launch.generate(ToySession(tok.vocab_size), tok, [req], SamplingParams(), 12, 128, stop=[stop],
                          on_text=lambda i, d: streamed.append(d))
    assert s.finish_reason == "stop" and s.text == free[:free.index(stop)] and "".join(streamed) == s.text


def test_detokenizer_streams_whole_characters_at_a_bounded_cost(tok, monkeypatch):
    """Token by token, the pieces join to the full decode; a character split over tokens (byte-level BPE) arrives
    whole; and no step decodes more than a few tokens, however long the text (streaming stays linear)."""
    text = "héllo wörld 你好 🙂 ok " * 20
    ids = tok.encode(text)
    sizes = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, *a, **k: sizes.append(len(ids)) or decode(ids, *a, **k))
    d = launch.Detokenizer(tok)
    pieces = [d.push(t, final=k == len(ids) - 1) for k, t in enumerate(ids)]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert "" in pieces and max(sizes) <= 8 and len(ids) > 200


def test_context_limit_is_a_user_error(tok):
    req = launch.Request("a", [{"role": "user", "content": "x " * 50}])
    with pytest.raises(launch.LaunchError, match="exceeds the context 16"):
        launch.generate(ToySession(tok.vocab_size), tok, [req], SamplingParams(), 4, 16)


def test_request_files(tmp_path):
    jl = tmp_path / "r.jsonl"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    jl.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "q"}], "tools": tools}) + "\n\n"
                  + json.dumps([{"role": "user", "content": "p"}]) + "\n" + json.dumps("plain") + "\n")
    reqs = launch.read_requests(jl)
    assert [r.id for r in reqs] == ["x", "1", "2"]
    assert "## Tools" in reqs[0].prompt() and reqs[0].prompt().startswith("<｜begin▁of▁sentence｜>\n\n## Tools")
    txt = tmp_path / "r.txt"
    txt.write_text("first\nsecond\n")
    assert [r.messages[0]["content"] for r in launch.read_requests(txt)] == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    for line, match in (({"messages": []}, "non-empty"), ({"messages": [{"role": "user", "content": 5}]}, "TypeError"),
                        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
                        ({"messages": [{"role": "user", "content": "q"}], "tools": [{"name": "x"}]}, "KeyError")):
        bad.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + json.dumps(line) + "\n")
        with pytest.raises(launch.LaunchError, match=f"bad.jsonl:2: .*{match}"):
            launch.read_requests(bad)


def test_ttft_counts_from_submission(tok):
    req = launch.Request("a", [{"role": "user", "content": "hello"}])
    [c] = launch.generate(ToySession(tok.vocab_size), tok, [req], SamplingParams(), 3, 128,
                          arrived=time.perf_counter() - 5.0)       # submitted 5 s ago, behind another batch
    assert c.ttft_s >= 5.0 and c.total_s >= c.ttft_s and c.tpot_s < 1.0


def test_dp_split_round_robin():
    reqs = [launch.Request(str(i), [{"role": "user", "content": "x"}]) for i in range(5)]
    assert [[r.id for r in b] for b in launch.split_for_dp(reqs, 2, 1, 1)] == [["1"], ["3"]]
    assert [[r.id for r in b] for b in launch.split_for_dp(reqs, 2, 0, 2)] == [["0", "2"], ["4"]]


def test_completion_with_tool_calls_parses_to_openai_json():
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]
    text = encode_messages([{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "Checking.", "tool_calls": calls}]).split("</think>", 1)[1]
    c = launch.Completion(launch.Request("t", [{"role": "user", "content": "q"}]), 5, tokens=[1], text=text)
    msg = c.to_dict()["message"]
    assert msg["content"] == "Checking." and msg["tool_calls"] == calls
    cut = launch.Completion(c.request, 5, tokens=[1], text=text[:-10], finish_reason="length")
    assert "parse_error" in cut.to_dict()["message"]
    # ended by a stop string (no EOS): the reply is complete as it stands
    stopped = launch.Completion(c.request, 5, tokens=[1], text="Paris is warm", finish_reason="stop")
    assert stopped.to_dict()["message"]["content"] == "Paris is warm"


def test_cache_session_graph_decode_equals_eager():
    """CacheSession with graphs (CPU: the Device's eager-replay graph) == without, over batches that reuse the
    bucket's cache and batches that need a new one; the eager side runs the dynamic MoE path."""
    from ascend.device import get_device
    from ascend.model_session import CacheSession, use_graphs
    from model.config import ModelConfig
    from model.moe import set_moe_mode
    from model.transformer import Transformer, init_random_

    model = init_random_(Transformer(ModelConfig.preset("tiny"), dtype=torch.float32), seed=1).eval()
    cpu = torch.device("cpu")
    graphed = CacheSession(model, cpu, graphs=get_device("cpu"), buckets=(1, 4))
    eager = CacheSession(model, cpu)
    kept = None
    for prompts, max_len in (([[5, 6, 7], list(range(10, 30)), [40]], 40),   # bucket 4: new cache + capture
                             ([[8, 9], [3, 4, 5, 6], [70, 71], [11]], 24),   # bucket 4 again, shorter: reused
                             ([[12, 13, 14]], 16)):                           # bucket 1: new cache
        set_moe_mode(model, "auto")
        a = graphed.prefill(prompts, max_len)
        if kept is not None and len(prompts) == 4:
            assert graphed._full is kept
        kept = graphed._full
        set_moe_mode(model, "dynamic")
        b = eager.prefill(prompts, max_len)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        active = torch.ones(len(prompts), dtype=torch.bool)
        for step in range(3):
            tokens = b.argmax(-1)
            active[0] = step < 1                     # the first sequence stops early and stays frozen
            set_moe_mode(model, "auto")
            a = graphed.decode(tokens, active)
            set_moe_mode(model, "dynamic")
            b = eager.decode(tokens, active)
            torch.testing.assert_close(a[active], b[active], rtol=1e-5, atol=1e-5)
        assert graphed._graphed and graphed.cache.lengths.tolist() == eager.cache.lengths.tolist()
    set_moe_mode(model, "auto")
    assert use_graphs(None, "cuda", "allreduce", 2) and not use_graphs(None, "npu", "allreduce", 1)
    assert not use_graphs(None, "cpu", "allreduce", 1) and use_graphs(None, "cuda", "alltoall", 2)
    assert not use_graphs(None, "npu", "alltoall", 2) and use_graphs(True, "npu", "alltoall", 2)
    assert not use_graphs(None, "cuda", "allgather", 2) and use_graphs(True, "npu", "allgather", 1)
    assert not use_graphs(False, "cuda", "allreduce", 1)


def test_graphs_without_token_exchange_ignore_the_vote():
    """Data-parallel groups vote each step (`Lockstep.world`) whatever the exchange, but graphs that hold no
    exchange between groups (all-reduce combine, or experts not split: a session that is not `fixed`) replay this
    batch's own: a batch of 1 whose vote says 4 (another group's batch; this session captured only bucket 1), or 0
    (a group idles), decodes as eagerly."""
    from ascend.device import get_device
    from ascend.model_session import CacheSession
    from model.config import ModelConfig
    from model.transformer import Transformer, init_random_

    model = init_random_(Transformer(ModelConfig.preset("tiny"), dtype=torch.float32), seed=1).eval()
    cpu = torch.device("cpu")
    graphed, eager = CacheSession(model, cpu, graphs=get_device("cpu"), buckets=(1, 4)), CacheSession(model, cpu)
    a, b = graphed.prefill([[5, 6, 7]], 16), eager.prefill([[5, 6, 7]], 16)
    active = torch.ones(1, dtype=torch.bool)
    for voted in (4, 0):
        assert graphed.replay_bucket() == 1
        a, b = graphed.decode(b.argmax(-1), active, voted), eager.decode(b.argmax(-1), active)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropped_graphed_session_frees_its_graphs_at_once():
    """Nothing the captured graphs hold points back at the session (no reference cycle), so dropping it frees its
    cache and graphs when the last reference goes, not at some later garbage collection."""
    import gc
    import weakref

    from ascend.device import get_device
    from ascend.model_session import CacheSession
    from model.config import ModelConfig
    from model.transformer import Transformer, init_random_

    model = init_random_(Transformer(ModelConfig.preset("tiny", n_layers=1, n_mtp_layers=0), dtype=torch.float32),
                         seed=1).eval()
    session = CacheSession(model, torch.device("cpu"), graphs=get_device("cpu"), buckets=(1,))
    session.prefill([[5, 6]], 8)
    runner = weakref.ref(session._runner)
    gc.disable()
    try:
        del session
        assert runner() is None
    finally:
        gc.enable()


def _lockstep_worker(rank, port, idle_replays, out_q):
    """One rank of dp2 x ep2 (all-to-all): a fixed graphed session, greedy decode voting each step's graph as
    `ascend.launch.generate` does; `idle_replays`: a rank done early replays the voted graph (else it steps
    eagerly, as a session without fixed graphs does)."""
    import os

    import torch.distributed as dist

    from ascend.device import get_device
    from ascend.expert_parallel import ExpertLayout, ExpertParallel
    from ascend.model_session import CacheSession
    from model.parallel import ParallelContext
    from model.transformer import Transformer, init_random_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = _lockstep_config()
    E, world = cfg.n_routed_experts, dist.group.WORLD
    ctx = ParallelContext(ep_rank=rank, ep_size=2, ep_group=world,
                          phy2log={layer: list(range(E)) for layer in range(cfg.n_layers)},
                          moe_exchange={layer: ExpertParallel(ExpertLayout(tuple(range(E)), 2, E), rank, world)
                                        for layer in range(cfg.n_layers)})
    full = init_random_(Transformer(cfg, dtype=torch.float32), seed=3).state_dict()
    model = Transformer(cfg, ctx, dtype=torch.float32)
    model.load_state_dict({k: v for k, v in full.items() if k in model.state_dict()})
    model.eval()
    cpu = torch.device("cpu")
    # every rank builds its session at once: the captures' warm-ups exchange tokens (padded all-to-all)
    session = CacheSession(model, cpu, graphs=get_device("cpu"), buckets=(1, 2, 4), fixed=(4, 32))
    idle, lockstep = CacheSession(model, cpu), launch.Lockstep(world=True)
    replays = session._runner = _ReplaySpy(session._runner)
    prompts, new_tokens = LOCKSTEP_PROMPTS[rank]
    logits = session.prefill(prompts, 32)
    tokens, buckets = [], []
    for step in range(new_tokens):
        nxt = logits.argmax(-1)
        tokens.append(nxt.tolist())
        busy = step + 1 < new_tokens
        anyone, bucket = lockstep.vote(busy, session.replay_bucket(), idle_replays)
        buckets.append(bucket)
        if not anyone:
            break
        if not busy:    # the other rank still decodes: keep stepping with it
            launch.idle_until_done(idle, lockstep, 0, session if idle_replays else None, bucket)
            break
        logits = session.decode(nxt, torch.ones(len(prompts), dtype=torch.bool), bucket)
    out_q.put((rank, tokens, buckets, replays.buckets_replayed))
    dist.destroy_process_group()


class _ReplaySpy:
    """A DecodeGraphRunner that records the bucket each replay was asked for (CPU replays re-run the step eagerly,
    with the sized exchange, which would tolerate ranks replaying different buckets)."""

    def __init__(self, runner):
        self.runner, self.buckets, self.buckets_replayed = runner, runner.buckets, []

    def __call__(self, *inputs, bucket=None):
        self.buckets_replayed.append(bucket)
        return self.runner(*inputs, bucket=bucket)


LOCKSTEP_PROMPTS = {0: ([[5, 6, 7], list(range(10, 22)), [40, 41]], 6), 1: ([[8, 9, 10, 11]], 3)}


def _lockstep_config():
    from model.config import ModelConfig

    return ModelConfig.preset("tiny", n_mtp_layers=0)


@pytest.mark.parametrize("idle_replays", [True, False])
def test_ranks_vote_which_decode_graph_to_replay(idle_replays):
    """dp2 x ep2 over the all-to-all with sessions captured at start (`CacheSession.fixed`): while both ranks
    decode they replay the same graph (bucket 4, the larger of their batches 3 and 1); once one rank is done it
    replays that graph with no live row, or, if it cannot, all step eagerly; the tokens equal one process
    holding every expert."""
    import torch.multiprocessing as mp

    from ascend.model_session import CacheSession
    from model.transformer import Transformer, init_random_
    from tests.conftest import free_port

    ctx = mp.get_context("spawn")
    out_q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_lockstep_worker, args=(r, port, idle_replays, out_q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (tokens, buckets, replayed) for r, tokens, buckets, replayed in (out_q.get(timeout=120)
                                                                                    for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    if idle_replays:    # rank 1 steps the bucket-4 graph empty while rank 0 finishes
        assert results[0][1] == [4, 4, 4, 4, 4, 0] and results[1][1] == [4, 4, 4]
        assert results[0][2] == results[1][2] == [4] * 5
    else:
        assert results[0][1] == [4, 4, 0, 0, 0, 0] and results[1][1] == [4, 4, 0]
        assert results[0][2] == results[1][2] == [4, 4]   # rank 1's one sequence rides in the bucket-4 graph
    model = init_random_(Transformer(_lockstep_config(), dtype=torch.float32), seed=3).eval()
    one = CacheSession(model, torch.device("cpu"))
    for rank, (prompts, new_tokens) in LOCKSTEP_PROMPTS.items():
        logits, want = one.prefill(prompts, 32), []
        for _ in range(new_tokens):
            want.append(logits.argmax(-1).tolist())
            logits = one.decode(logits.argmax(-1), torch.ones(len(prompts), dtype=torch.bool))
        assert results[rank][0] == want, rank


def test_cache_session_compiled_graph_decode_equals_eager(monkeypatch):
    """CacheSession(compile=True) captures the decode step through compile_decode: traced as one graph (a graph
    break is an error), replayed per bucket, equal to eager decode. On CPU the trace runs under dynamo's aot_eager
    backend (inductor's CPU code generation has no float8_e8m0fnu); the H200 runs inductor (docs/performance.md)."""
    import functools

    from ascend.backends import cuda
    from ascend.device import get_device
    from ascend.model_session import CacheSession
    from model.config import ModelConfig
    from model.moe import set_moe_mode
    from model.transformer import Transformer, init_random_

    monkeypatch.setattr(cuda, "compile_decode", functools.partial(cuda.compile_decode, backend="aot_eager"))
    model = init_random_(Transformer(ModelConfig.preset("tiny"), dtype=torch.float32), seed=2).eval()
    cpu = torch.device("cpu")
    compiled = CacheSession(model, cpu, graphs=get_device("cpu"), buckets=(2,), compile=True)
    eager = CacheSession(model, cpu)

    def static(call, *args):
        # the capture traces with the MoE layers static; the CPU's eager "replays" call the compiled step again,
        # which in the default mode would fail that guard and trace it all a second time (~35 s; a CUDA replay
        # runs no Python); the eager session keeps the default mode
        set_moe_mode(model, "static")
        try:
            return call(*args)
        finally:
            set_moe_mode(model, "auto")

    prompts = [[5, 6, 7, 8, 9], list(range(10, 17))]
    a, b = static(compiled.prefill, prompts, 24), eager.prefill(prompts, 24)
    active = torch.ones(2, dtype=torch.bool)
    for _ in range(3):
        tokens = b.argmax(-1)
        a, b = static(compiled.decode, tokens, active), eager.decode(tokens, active)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert compiled._graphed and compiled.compile


def test_compile_is_refused_before_loading_where_it_cannot_run(tmp_path):
    from types import SimpleNamespace

    from ascend.device import get_device
    from ascend.launch import LaunchError
    from ascend.model_session import build_session

    plan = SimpleNamespace(tp=1, ep=1, world_size=1, settings={})
    mesh = SimpleNamespace(device=get_device("cpu"))
    with pytest.raises(LaunchError, match="--compile needs CUDA with captured decode graphs"):
        build_session(tmp_path / "missing", SimpleNamespace(plan=plan), mesh, compile=True)
    cuda = SimpleNamespace(type="cuda")                 # what the check reads of a CUDA device
    two = SimpleNamespace(tp=2, ep=1, world_size=2, settings={})
    with pytest.raises(LaunchError, match="--compile is for one device; this plan has 2 ranks"):
        build_session(tmp_path / "missing", SimpleNamespace(plan=two), SimpleNamespace(device=cuda), compile=True)
    # chunked prefill is one forward per chunk: data-parallel groups exchanging tokens would pair unequal counts
    dp_ep = SimpleNamespace(tp=1, ep=2, dp=2, world_size=2, settings={})
    with pytest.raises(LaunchError, match="--prefill-chunk with the alltoall expert exchange across 2 data-par"):
        build_session(tmp_path / "missing", SimpleNamespace(plan=dp_ep), mesh, prefill_chunk=512)


class _Pending(torch.Tensor):
    """Sampled tokens whose `tolist` takes 0.2 s, as a CUDA step that the host waits for there."""

    def tolist(self):
        time.sleep(0.2)
        return super().tolist()


def test_token_times_count_the_step_that_made_them(tok, monkeypatch):
    """TTFT includes the prefill's device time and total_s the last step's: the clock is read after the host has
    waited for the tokens (before, each timestamp trailed its step by one, TTFT ~0 and TPOT took the prefill)."""
    req = launch.Request("a", [{"role": "user", "content": "hello"}])
    monkeypatch.setattr(launch.Lockstep, "same_tokens", lambda self, t: t.as_subclass(_Pending))
    [c] = launch.generate(ToySession(tok.vocab_size), tok, [req], SamplingParams(), 3, 128)
    assert c.ttft_s >= 0.2 and c.total_s >= 0.6 and 0.15 <= c.tpot_s < 0.4


@pytest.mark.parametrize("stop", ["end", "sentence"])
def test_stop_string_inside_the_eos_marker_does_not_cut_it(tok, stop):
    """A stop string that occurs only inside `<｜end▁of▁sentence｜>` does not match there: the reply ends at EOS
    with its marker whole, and nothing of it is streamed (it ended with '<｜' or '<｜end▁of▁' before)."""
    req = launch.Request("a", [{"role": "user", "content": "hello"}], max_new_tokens=50)
    prompt_len = len(tok.encode(req.prompt()))
    streamed = []
    [c] = launch.generate(ToySession(tok.vocab_size, eos_at=prompt_len + 3), tok, [req], SamplingParams(), 50, 128,
                          stop=[stop], on_text=lambda i, d: streamed.append(d))
    assert c.finish_reason == "stop" and c.text == tok.decode(c.tokens)
    assert c.text.endswith("<｜end▁of▁sentence｜>")
    assert "".join(streamed) + "<｜end▁of▁sentence｜>" == c.text


def test_overlong_request_is_refused_before_any_batch(tok):
    """Every request is measured up front: the second of three outgrows the context, named by its place and id."""
    reqs = [launch.Request(str(i), [{"role": "user", "content": "x " * n}]) for i, n in enumerate((1, 50, 1))]
    with pytest.raises(launch.LaunchError, match=r"^req.jsonl: request 2 \(1\): a prompt of \d+ tokens plus 4 new"):
        launch.check_lengths(reqs, tok, 4, 32, "req.jsonl")
    launch.check_lengths(reqs[::2], tok, 4, 32, "req.jsonl")


def _serve_args(**kw):
    import argparse
    base = dict(temperature=1.0, top_k=0, top_p=1.0, seed=7, max_batch=1, max_new_tokens=6, max_len=128, stop=[],
                dump_logits=False, inject_failure=None)
    return argparse.Namespace(**{**base, **kw})


def test_each_batch_and_chat_turn_samples_its_own_stream(tok):
    """Sampled replies to the same request differ from batch to batch and from turn to turn (one seed for every
    batch gave request i of each batch the same random stream), a run repeats itself, and the next seed's run is
    not this one shifted by a batch (as with seed + k)."""
    from types import SimpleNamespace

    from ascend.serve import serve_batches
    mesh = SimpleNamespace(dp_rank=0, dp_size=1, rank=0, tp_rank=0, distributed=False)
    req = [launch.Request(str(i), [{"role": "user", "content": "hello"}]) for i in range(3)]

    def run(batches_before=0, seed=7):
        session = ToySession(tok.vocab_size)          # one-hot logits: at temperature 1 nearly uniform draws
        return [r["tokens"] for r in serve_batches(_serve_args(seed=seed), mesh, session, session, tok, req,
                                                    launch.Lockstep(), stream=False, batches_before=batches_before)]

    first = run()
    assert len({tuple(t) for t in first}) == 3
    assert run() == first
    assert run(batches_before=1)[:2] == first[1:]     # the next chat turn draws as the next batch would
    assert run(seed=8)[:2] != first[1:]


def test_one_token_replies_have_no_time_per_output_token(tok):
    reqs = [launch.Request(str(i), [{"role": "user", "content": "hi"}], max_new_tokens=n) for i, n in enumerate((1, 3))]
    done = launch.generate(ToySession(tok.vocab_size), tok, reqs, SamplingParams(), 3, 128)
    one, three = (c.to_dict() for c in done)
    assert one["tpot_s"] is None and three["tpot_s"] is not None
    assert launch.summary([one, three], 1.0)["mean_tpot_s"] == three["tpot_s"]     # not halved by the 0 it had
    assert launch.summary([one], 1.0)["mean_tpot_s"] is None


class _NaNSession(ToySession):
    """Row 1's logits turn NaN from its third output token on."""

    def forward(self, ids, n_valid):
        logits = super().forward(ids, n_valid)
        if int(self.steps) >= 2:
            logits[1] = float("nan")
        self.steps += 1
        return logits

    def prefill(self, prompts, max_len):
        self.steps = 0
        return super().prefill(prompts, max_len)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=0)])
def test_nan_logits_end_the_run_naming_the_request(tok, sampling):
    """NaN logits are an error naming the request and the token, greedy or sampled (torch.multinomial raised, or on
    CUDA stopped the device, on a NaN row; argmax quietly took the NaN's position)."""
    reqs = [launch.Request(name, [{"role": "user", "content": "hi"}]) for name in ("a", "b")]
    with pytest.raises(launch.LaunchError, match="request b: the model's logits hold NaN or infinite values at "
                                                 "output token 3"):
        launch.generate(_NaNSession(tok.vocab_size), tok, reqs, sampling, 6, 128)


def test_growing_contexts_capture_again_only_every_quarter(monkeypatch):
    """A graphed session's cache is sized to the batch's length rounded up to a multiple of an eighth of the next
    power of two (at most 25% more, and at most its max_len): a conversation growing turn by turn re-captures (and
    with --compile recompiles) about every 25% of growth, not at every turn."""
    from ascend.device import get_device
    from ascend.model_session import CacheSession
    from model.config import ModelConfig
    from model.transformer import Transformer, init_random_

    model = init_random_(Transformer(ModelConfig.preset("tiny", n_layers=1, n_mtp_layers=0), dtype=torch.float32),
                         seed=1).eval()
    session = CacheSession(model, torch.device("cpu"), graphs=get_device("cpu"), buckets=(1,), max_len=200)
    captured = []
    real = CacheSession._capture
    monkeypatch.setattr(CacheSession, "_capture", lambda self, rows, n, b: (captured.append(n), real(self, rows, n, b)))
    for need in (40, 41, 45, 48, 49, 60, 64, 65, 70, 80, 190, 199):
        session.prefill([[5, 6]], need)
    assert captured == [40, 48, 56, 64, 80, 192, 200] and session._full.max_len == 200    # 199 -> 224, capped
    assert all(session._capacity(n) <= 1.25 * n for n in range(1, 200))
