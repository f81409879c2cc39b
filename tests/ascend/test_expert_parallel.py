"""EP dispatch/combine over Gloo equals the single-process sum over routed experts, with replicas,
and counts the bytes it moves exactly."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ascend.expert_parallel import ExpertLayout, ExpertParallel, ExpertParallelError, total_traffic

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
        # known routing: every token picks experts 2 (slot 2, rank 0 only) and 3 (slot 3, rank 1 only)
        n = 5 if tp > 1 else 3 + 2 * rank
        x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(3 if tp > 1 else rank))
        w, i = torch.full((n, K), 0.5), torch.tensor([[2, 3]] * n)
        ep.traffic.reset()
        ok = torch.allclose(ep(x, w, i, expert_fn), reference(x, w, i), atol=1e-5)
        results[("bytes", rank, tp, scheme)] = (ok, ep.traffic.to_dict(), total_traffic([ep, ep]).to_dict())
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """One Gloo job of 2 processes running every case."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(tmp_path_factory.mktemp("gloo") / "init", results), nprocs=2)
    return dict(results)


def test_two_rank_exchange_matches_single_process(two_rank_results):
    """TP=2 and DP x EP=2, both exchange schemes."""
    results = two_rank_results
    for tp, scheme in CASES:
        ranks = [results[(r, tp, scheme)] for r in range(2)]
        assert all(ok for ok, _ in ranks), (tp, scheme, ranks)
        # every (token, expert) pair computed exactly once over both ranks
        assert sum(c for _, c in ranks) == (5 if tp > 1 else 3 + 5) * K


def _expected_bytes(rank: int, tp: int, scheme: str) -> tuple[dict, dict]:
    """Hand count for the known routing (fp32 rows of DIM, float32 meta / int64 ids, int64 counts)."""
    row, other = DIM * 4, 1 - rank
    if tp > 1:   # 5 shared tokens, tp shares of ceil(5/2) = 3 rows: rank 0 takes rows 0-2, rank 1 rows 3-4
        mine, theirs = (3, 2) if rank == 0 else (2, 3)
        gather = 3 * row
    else:
        mine, theirs, gather = 3 + 2 * rank, 3 + 2 * other, 0
    if scheme == "alltoall":  # each token has exactly one pair on the other rank: its expert 3 (rank 0) or 2
        sent = {"counts": 8, "dispatch": mine * row, "meta": mine * 8, "combine": theirs * row, "tp_gather": gather}
        received = {"counts": 8, "dispatch": theirs * row, "meta": theirs * 8, "combine": mine * row,
                    "tp_gather": gather}
        return sent, received
    width = max(mine, theirs)  # all-gather pads every rank to the widest
    sent = {"counts": 8, "dispatch": width * row, "meta": width * K * (4 + 8), "combine": width * row,
            "tp_gather": gather}
    return sent, dict(sent)


def test_two_rank_exchange_counts_bytes(two_rank_results):
    """Counted bytes equal the hand count for a routing where every token has one remote pair."""
    results = two_rank_results
    for tp, scheme in CASES:
        for rank in range(2):
            ok, traffic, doubled = results[("bytes", rank, tp, scheme)]
            assert ok, (rank, tp, scheme)
            sent, received = _expected_bytes(rank, tp, scheme)
            assert traffic["calls"] == 1
            assert traffic["sent"] == sent and traffic["received"] == received, (rank, tp, scheme, traffic)
            assert doubled["sent_total"] == 2 * sum(sent.values()) and doubled["calls"] == 2


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
