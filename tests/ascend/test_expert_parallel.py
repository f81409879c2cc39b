"""EP dispatch/combine over Gloo equals the single-process sum over routed experts, with replicas."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ascend.expert_parallel import ExpertLayout, ExpertParallel, ExpertParallelError

E, K, DIM = 4, 2, 8
PHY2LOG = (0, 1, 2, 3, 0, 1)  # ep=2, 3 slots per rank; experts 0 and 1 have a replica on each rank


def _problem(n_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, DIM, generator=g)
    scores = torch.rand(n_tokens, E, generator=g)
    weights, indices = scores.topk(K, dim=1)
    return x, weights, indices


W = torch.randn(E, DIM, DIM, generator=torch.Generator().manual_seed(7))
calls: list[int] = []


def expert_fn(e, rows, w):
    calls.append(rows.shape[0])
    return (rows @ W[e]) * w[:, None]


def reference(x, weights, indices):
    return torch.stack([sum(x[t] @ W[indices[t, j]] * weights[t, j] for j in range(K)) for t in range(len(x))])


CASES = [(tp, scheme) for tp in (1, 2) for scheme in ("alltoall", "allgather")]


def _worker(rank, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for tp, scheme in CASES:
        # tp = 2: both ranks hold the same tokens; tp = 1 (dp x ep): each rank its own, of different counts
        x, w, i = _problem(5, 0) if tp > 1 else _problem(3 + 2 * rank, rank)
        ep = ExpertParallel(ExpertLayout(PHY2LOG, 2, E), ep_rank=rank, ep_group=dist.group.WORLD,
                            tp_rank=rank % tp, tp_size=tp, tp_group=dist.group.WORLD if tp > 1 else None,
                            scheme=scheme)
        calls.clear()
        y = ep(x, w, i, expert_fn)
        results[(rank, tp, scheme)] = (torch.allclose(y, reference(x, w, i), atol=1e-5), sum(calls))
    dist.destroy_process_group()


def test_two_rank_exchange_matches_single_process(tmp_path):
    """TP=2 and DP x EP=2, both exchange schemes, one Gloo job."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(tmp_path / "init", results), nprocs=2)
    for tp, scheme in CASES:
        ranks = [results[(r, tp, scheme)] for r in range(2)]
        assert all(ok for ok, _ in ranks), (tp, scheme, ranks)
        # every (token, expert) pair computed exactly once over both ranks
        assert sum(c for _, c in ranks) == (5 if tp > 1 else 3 + 5) * K


def test_single_rank_and_replica_spread():
    layout = ExpertLayout(PHY2LOG, 2, E)
    assert layout.experts_on(1) == [3, 0, 1]
    slots = layout.choose_slots(torch.zeros(4, 1, dtype=torch.long))
    assert slots.flatten().tolist() == [0, 4, 0, 4]  # expert 0's rows alternate between its replicas
    x, w, i = _problem(6, 1)
    y = ExpertParallel(ExpertLayout((0, 1, 2, 3), 1, E))(x, w, i, expert_fn)
    assert torch.allclose(y, reference(x, w, i), atol=1e-5)


def test_placement_missing_an_expert_is_refused():
    with pytest.raises(ExpertParallelError, match=r"no replica of experts \[3\]"):
        ExpertLayout((0, 1, 2, 0), 2, E)
