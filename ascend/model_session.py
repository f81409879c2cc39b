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
    """

    def __init__(self, model: Any, device: torch.device, prefill_chunk: int | None = None, graphs: Any = None,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, compile: bool = False):
        self.model, self.device, self.prefill_chunk, self.cache = model, device, prefill_chunk, None
        self.graphs, self.buckets, self.compile = graphs, tuple(sorted(buckets)), compile
        self._full = None        # the graph path's cache: bucket rows, reused across batches that fit it
        self._runner = None      # DecodeGraphRunner over self._full
        self._graphed = False    # whether this batch decodes through self._runner

    def _graph_cache(self, batch: int, max_len: int) -> Any | None:
        """The bucket-sized cache (captured graph included) for a batch of `batch` rows, or None: run eagerly."""
        if self.graphs is None or batch > self.buckets[-1]:
            return None
        rows = bucket_for(batch, self.buckets)
        full = self._full
        if full is None or full.batch != rows or full.max_len < max_len:
            self.cache = self._full = self._runner = None             # free the old cache and graph first
            self.graphs.empty_cache()
            full, model = self.model.new_cache(rows, max_len, device=self.device), self.model
            # the step holds the model, not self: no reference cycle keeps a dropped session's graphs alive
            step = lambda tok, act: decode_step(model, tok, full, act)  # noqa: E731
            if self.compile:
                from ascend.backends.cuda import compile_decode

                torch._dynamo.reset()       # the previous cache's graph is gone: do not count it as a recompile
                step = compile_decode(step)
            runner = DecodeGraphRunner(step,
                                       lambda b: (torch.zeros(b, dtype=torch.long, device=self.device),
                                                  torch.zeros(b, dtype=torch.bool, device=self.device)),
                                       self.graphs, buckets=(rows,))
            modes = [(m, m.mode) for m in self.model.modules() if isinstance(m, MoE)]
            set_moe_mode(self.model, "static")      # warm-up runs too, so the capture meets warm allocations
            try:
                runner.capture()
            finally:
                for m, mode in modes:
                    m.mode = mode
            self._full, self._runner = full, runner
        full.reset()
        return full

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_len: int) -> torch.Tensor:
        self.cache = None  # free the previous batch's cache first
        full = self._graph_cache(len(prompts), max_len)
        self._graphed = full is not None
        if full is None:
            self.cache = self.model.new_cache(len(prompts), max_len, device=self.device)
        else:
            self.cache = batch_rows(full, len(prompts))
        return prefill(self.model, prompts, self.cache, self.prefill_chunk)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        tokens, active = tokens.to(self.device), active.to(self.device)
        if self._graphed:
            return self._runner(tokens, active)
        return decode_step(self.model, tokens, self.cache, active)


def parallel_context(plan: Any, mesh: Any, exchange: str) -> Any:
    from model.parallel import ParallelContext

    phy2log = {layer: [int(e) for e in plan.phy2log[layer]] for layer in range(plan.n_moe_layers)}
    ctx = ParallelContext(tp_rank=mesh.tp_rank, tp_size=plan.tp, tp_group=mesh.tp_group, ep_rank=mesh.ep_rank,
                          ep_size=plan.ep, ep_group=mesh.ep_group, phy2log=phy2log)
    if exchange != "allreduce" and plan.ep > 1:
        ctx.moe_exchange = {
            layer: ExpertParallel(ExpertLayout(tuple(slots), plan.ep, plan.n_routed_experts, mesh.device.torch_device),
                                  mesh.ep_rank, mesh.ep_group, mesh.tp_rank, plan.tp, mesh.tp_group, exchange)
            for layer, slots in phy2log.items()}
    return ctx


def compute_dtype(device_type: str) -> torch.dtype:
    """BF16 activations on accelerators; float32 on CPU, where BF16 matmuls are slow and sharded sums drift."""
    return torch.float32 if device_type == "cpu" else torch.bfloat16


def use_graphs(requested: bool | None, device_type: str, exchange: str, ep: int) -> bool:
    """Decode graph capture: on CUDA by default (None); never on CPU (no graphs) or with an all-to-all /
    all-gather expert exchange. The padded all-to-all would capture, but its warm-up and capture hold collectives
    that every rank of the expert-parallel group must run together, on the same batch bucket, while the
    launcher's data-parallel groups step independently (their own batches, prefills and idle steps)."""
    if requested is False or device_type == "cpu" or (exchange != "allreduce" and ep > 1):
        return False
    return requested or device_type == "cuda"


def build_session(ckpt: str | Path, checked: Checked, mesh: Any, exchange: str = "auto",
                  prefill_chunk: int | None = None, graphs: bool | None = None, compile: bool = False
                  ) -> tuple[CacheSession, CacheSession, str]:
    """Load this rank's shard into a parallel Transformer; returns (session, idle session, exchange used).

    `graphs`: capture decode (see `use_graphs`; None = the device's default). `compile`: capture the decode step
    compiled by torch.compile (CUDA, with graphs only: refused before any weight is loaded otherwise)."""
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
    return (CacheSession(model, device, prefill_chunk, graph_device, compile=compile), CacheSession(model, device),
            exchange)
