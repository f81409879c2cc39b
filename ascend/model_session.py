"""This rank's model: the parallel context from the mesh and the plan, the weights of its shard, a KV cache.

Tensor parallelism lives in the model (`ParallelContext`); here we only decide how routed experts
exchange tokens. When every rank of an expert-parallel group holds the same tokens (ep divides tp)
the model's own all-reduce combine is exact and cheapest. When an ep group spans data-parallel groups
(different prompts), tokens must travel: `ascend.expert_parallel` all-to-all or all-gather.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ascend.expert_parallel import ExpertLayout, ExpertParallel
from ascend.graph import DEFAULT_BUCKETS, DecodeGraphRunner, batch_rows, bucket_for
from ascend.launch import Checked, LaunchError
from model.generate import decode_step, prefill
from model.kernels import Kernels
from model.moe import MoE, set_moe_mode

EXCHANGES = ("allreduce", "alltoall", "allgather")


def choose_exchange(requested: str, plan: Any) -> str:
    """The expert exchange for `requested` in auto|allreduce|alltoall|allgather under `plan`."""
    tokens_shared = plan.tp % plan.ep == 0  # each ep group sits inside one tp group: same tokens everywhere
    if requested == "auto":
        requested = plan.settings.get("moe_exchange") or ("allreduce" if tokens_shared else "alltoall")
    if requested not in EXCHANGES:
        raise LaunchError(f"plan setting moe_exchange = {requested!r}: expected one of {EXCHANGES}")
    if requested == "allreduce" and not tokens_shared:
        raise LaunchError(f"--moe-exchange allreduce needs every expert-parallel group inside one tensor-parallel "
                          f"group (ep {plan.ep} dividing tp {plan.tp}); use alltoall or allgather")
    return requested


class CacheSession:
    """`ascend.launch.Session` over a Transformer (model.generate's prefill / decode_step on a KV cache).

    With `graphs` (an accelerator `ascend.device.Device`), decode replays a captured graph: the batch is padded to
    the smallest of `buckets` that holds it, the cache is allocated for that many rows and kept while later
    batches fit it (same bucket, no longer context), and the graph is captured once per such cache. Padding rows
    are inactive, so they neither move nor write. The MoE layers run their static-shape path inside the graph.
    With `compile` the captured step is the decode step compiled by `ascend.backends.cuda.compile_decode` (one
    inductor graph per cache; the model should hold `make_kernels(for_compile=True)`).

    Without `fixed`, a cache is captured for the batch's length rounded up by at most 25% (`_capacity`; at most
    `max_len`, the longest context a batch may ask for), so that a growing context does not re-capture every turn.

    `fixed` = (max batch, max length): capture now, once, every bucket up to the max batch over one cache of that
    size, and never again. For token exchanges (the padded all-to-all) whose graphs hold collectives: every rank
    constructs its session at the same moment, so their warm-ups and captures pair up, and later batches never
    capture (a rank's prefill may meet another rank's decode). Which bucket to replay, or none, is then the
    ranks' common choice (`replay_bucket`, `decode(bucket=)`, `ascend.launch.Lockstep.vote`).
    """

    def __init__(self, model: Any, device: torch.device, prefill_chunk: int | None = None, graphs: Any = None,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, compile: bool = False,
                 fixed: tuple[int, int] | None = None, max_len: int | None = None):
        self.model, self.device, self.prefill_chunk, self.cache = model, device, prefill_chunk, None
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.graphs, self.buckets, self.compile, self.fixed = graphs, tuple(sorted(buckets)), compile, fixed
        self._full = None        # the graph path's cache: bucket rows, reused across batches that fit it
        self._runner = None      # DecodeGraphRunner over self._full
        self._graphed = False    # whether this batch decodes through self._runner
        self._batch = 0
        if fixed and graphs is not None:
            rows = bucket_for(min(fixed[0], self.buckets[-1]), self.buckets)
            self._capture(rows, fixed[1], tuple(b for b in self.buckets if b <= rows))

    @property
    def kernels(self) -> Kernels:
        """The model's `Kernels` (the launcher's sampler picks with its argmax)."""
        return self.model.kernels

    def _capture(self, rows: int, max_len: int, buckets: tuple[int, ...]) -> None:
        """A cache of `rows` x `max_len` and the decode graph of each bucket over its first rows."""
        self.cache = self._full = self._runner = None             # free the old cache and graph first
        self.graphs.empty_cache()
        full, model, device = self.model.new_cache(rows, max_len, device=self.device), self.model, self.device
        views = {b: full if b == rows else batch_rows(full, b) for b in buckets}   # built once, outside the graphs
        # the step and the inputs hold the model and device, not self: no reference cycle keeps a dropped
        # session's graphs alive
        step = lambda tok, act: decode_step(model, tok, views[tok.shape[0]], act)  # noqa: E731
        if self.compile:
            from ascend.backends.cuda import compile_decode

            torch._dynamo.reset()       # the previous cache's graph is gone: do not count it as a recompile
            step = compile_decode(step)
        runner = DecodeGraphRunner(step,
                                   lambda b: (torch.zeros(b, dtype=torch.long, device=device),
                                              torch.zeros(b, dtype=torch.bool, device=device)),
                                   self.graphs, buckets=buckets)
        modes = [(m, m.mode) for m in self.model.modules() if isinstance(m, MoE)]
        set_moe_mode(self.model, "static")      # warm-up runs too, so the capture meets warm allocations
        try:
            runner.capture()
        finally:
            for m, mode in modes:
                m.mode = mode
        self._full, self._runner = full, runner

    def _capacity(self, need: int) -> int:
        """A new cache's length for a batch that needs `need` positions: rounded up to a multiple of an eighth of
        the next power of two (at most 25% more), capped at the session's max_len. A context growing turn by turn
        (a chat) then captures, and with --compile compiles, again about every 25% of growth, not at every turn;
        finer steps would recapture more often, coarser ones cost more: HCA attends every entry of the cache and the
        indexer scores them all, so a step's attention work follows the capacity, not the length."""
        step = 1 << max(0, (need - 1).bit_length() - 3)
        return max(need, min(-(-need // step) * step, self.max_len))

    def _graph_cache(self, batch: int, max_len: int) -> Any | None:
        """The bucket-sized cache (captured graph included) for a batch of `batch` rows, or None: run eagerly."""
        if self.graphs is None or batch > self.buckets[-1]:
            return None
        if self.fixed:
            fits = self._full is not None and batch <= self._full.batch and max_len <= self._full.max_len
            if not fits:
                return None
        else:
            rows = bucket_for(batch, self.buckets)
            if self._full is None or self._full.batch != rows or self._full.max_len < max_len:
                self._capture(rows, self._capacity(max_len), (rows,))
        self._full.reset()
        return self._full

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_len: int) -> torch.Tensor:
        self.cache = None  # free the previous batch's cache first
        full = self._graph_cache(len(prompts), max_len)
        self._graphed, self._batch = full is not None, len(prompts)
        if full is None:
            self.cache = self.model.new_cache(len(prompts), max_len, device=self.device)
        else:
            self.cache = batch_rows(full, len(prompts))
        return prefill(self.model, prompts, self.cache, self.prefill_chunk)

    def replay_bucket(self) -> int:
        """The graph this batch's decode would replay (its batch size), or 0: it decodes eagerly."""
        return bucket_for(self._batch, self._runner.buckets) if self._graphed else 0

    def can_replay_idle(self) -> bool:
        """A fixed session replays any of its buckets with no live row, whatever batch it last held."""
        return bool(self.fixed) and self._runner is not None

    @torch.inference_mode()
    def replay_idle(self, bucket: int) -> None:
        """Step the graph of `bucket` with every row inactive (nothing moves or is written): this rank's part of
        the others' exchanges while it has nothing to decode."""
        idle = torch.zeros(bucket, dtype=torch.long, device=self.device)
        self._runner(idle, idle.bool(), bucket=bucket)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor, bucket: int | None = None) -> torch.Tensor:
        """One step; `bucket`: the ranks' choice for a `fixed` session, replay that graph (None: this batch's own,
        0: decode eagerly). Other sessions' graphs exchange nothing between data-parallel groups, which may vote a
        bucket they never captured: they replay this batch's own."""
        tokens, active = tokens.to(self.device), active.to(self.device)
        if self._graphed and (bucket != 0 or not self.fixed):
            return self._runner(tokens, active, bucket=bucket if self.fixed else None)
        return decode_step(self.model, tokens, self.cache, active)


def use_graphs(requested: bool | None, device_type: str, exchange: str, ep: int) -> bool:
    """Decode graph capture: never on CPU (no graphs) or with the all-gather expert exchange, whose message sizes
    follow the ranks' token counts. By default (None) on CUDA, where it has run (the all-to-all in its padded form:
    on 2 H200, 5-10x faster than eager at Flash width, docs/performance.md); on request (True) also on NPUs."""
    if requested is False or device_type == "cpu" or (exchange == "allgather" and ep > 1):
        return False
    return requested or device_type == "cuda"


def parallel_context(plan: Any, mesh: Any, exchange: str, count_traffic: bool = False) -> Any:
    """The model's `ParallelContext` for this rank; `count_traffic`: the expert exchanges count their bytes in
    captured graphs too (device counters: a few small kernels per MoE layer and step, so off unless measured)."""
    from model.parallel import ParallelContext

    phy2log = {layer: [int(e) for e in plan.phy2log[layer]] for layer in range(plan.n_moe_layers)}
    ctx = ParallelContext(tp_rank=mesh.tp_rank, tp_size=plan.tp, tp_group=mesh.tp_group, ep_rank=mesh.ep_rank,
                          ep_size=plan.ep, ep_group=mesh.ep_group, phy2log=phy2log)
    if exchange != "allreduce" and plan.ep > 1:
        ctx.moe_exchange = {
            layer: ExpertParallel(ExpertLayout(tuple(slots), plan.ep, plan.n_routed_experts, mesh.device.torch_device),
                                  mesh.ep_rank, mesh.ep_group, mesh.tp_rank, plan.tp, mesh.tp_group, exchange,
                                  count_on_device=count_traffic)
            for layer, slots in phy2log.items()}
    return ctx


def compute_dtype(device_type: str) -> torch.dtype:
    """BF16 activations on accelerators; float32 on CPU, where BF16 matmuls are slow and sharded sums drift."""
    return torch.float32 if device_type == "cpu" else torch.bfloat16


def build_session(ckpt: str | Path, checked: Checked, mesh: Any, exchange: str = "auto",
                  prefill_chunk: int | None = None, graphs: bool | None = None, compile: bool = False,
                  max_batch: int = 8, max_len: int = 4096) -> tuple[CacheSession, CacheSession, str]:
    """Load this rank's shard into a parallel Transformer; returns (session, idle session, exchange used).

    `graphs`: capture decode (see `use_graphs`; None = the device's default). `compile`: capture the decode step
    compiled by torch.compile (CUDA, with graphs only: refused before any weight is loaded otherwise). With an
    all-to-all expert exchange the graphs are captured here, for batches up to `max_batch` and `max_len` tokens
    (`CacheSession.fixed`): every rank calls this at the same moment."""
    from ascend.backends import get_kernels
    from convert.manifest import load_rank
    from model.transformer import Transformer

    plan = checked.plan
    exchange = choose_exchange(exchange, plan)
    graphed = use_graphs(graphs, mesh.device.type, exchange, plan.ep)
    if compile and not (mesh.device.type == "cuda" and graphed):
        raise LaunchError(f"--compile needs CUDA with captured decode graphs (here: {mesh.device.type}, graphs "
                          f"{'on' if graphed else 'off'}); drop --compile")
    if compile and plan.world_size > 1:     # collectives inside a compiled step have not been traced or tested
        raise LaunchError(f"--compile is for one device; this plan has {plan.world_size} ranks; drop --compile")
    if prefill_chunk and exchange != "allreduce" and plan.ep > 1 and plan.dp > 1:
        # each chunk is one forward: groups with longer prompts would run more expert exchanges than the others
        raise LaunchError(f"--prefill-chunk with the {exchange} expert exchange across {plan.dp} data-parallel "
                          f"groups would pair different numbers of forwards on different ranks; drop --prefill-chunk")
    ctx = parallel_context(plan, mesh, exchange)
    device = mesh.device.torch_device
    kernels = get_kernels(mesh.device)
    if compile:
        from ascend.backends.cuda import make_kernels

        kernels = make_kernels(for_compile=True)
    with torch.device(device):
        model = Transformer(checked.config, ctx, kernels, compute_dtype(mesh.device.type))
    try:
        state = load_rank(ckpt, mesh.rank)  # experts named by logical id, as the model's
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own types on damaged files
        raise LaunchError(f"{ckpt}: cannot read rank {mesh.rank}'s shard ({type(e).__name__}: {e}); "
                          f"run `ascend verify {ckpt}`") from None
    model.load_weights(state)
    model.eval()
    graph_device = mesh.device if graphed else None
    fixed = (max_batch, max_len) if graphed and exchange == "alltoall" and plan.ep > 1 else None
    return (CacheSession(model, device, prefill_chunk, graph_device, compile=compile, fixed=fixed, max_len=max_len),
            CacheSession(model, device), exchange)
