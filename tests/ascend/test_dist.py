"""The dp x tp x ep mesh: rank layout, validation, and real Gloo process groups under torchrun.

The multi-process tests launch this file itself with `python -m torch.distributed.run`, so the
worker joins through torchrun's own store exactly as a deployment does. Each worker builds several
meshes in turn (init, all_reduce on every subgroup, destroy) and writes which ranks answered in each
group; the test compares that with the rank formulas of the Plan contract, written out here again.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from ascend.dist import DistError, LaunchEnv, init, mesh_groups

CASES = {2: [(1, 1), (2, 1), (1, 2), (2, 2)],  # (tp, ep): dp=2; dp=1,tp=2; dp=2,tp=1,ep=2; all of one
         4: [(2, 2), (2, 4), (4, 1)]}


def expected(world: int, tp: int, ep: int, rank: int) -> dict[str, list[int]]:
    """Members of each of `rank`'s groups: tp shares rank // tp, dp shares rank % tp,
    ep shares the block rank // ep, replicas share ep_rank = rank % ep."""
    same = {"tp": lambda r: r // tp, "dp": lambda r: r % tp, "ep": lambda r: r // ep, "ep_replica": lambda r: r % ep}
    return {kind: [r for r in range(world) if key(r) == key(rank)] for kind, key in same.items()}


def test_mesh_groups_partition_the_world():
    for world in (1, 2, 4, 8, 16):
        for tp in (t for t in (1, 2, 4, 8) if world % t == 0):
            for ep in (e for e in (1, 2, 4, 8, 16) if world % e == 0):
                groups = mesh_groups(world, tp, ep)
                for kind, lists in groups.items():
                    assert sorted(r for g in lists for r in g) == list(range(world)), kind
                for rank in range(world):
                    mine = {kind: next(g for g in lists if rank in g) for kind, lists in groups.items()}
                    assert mine == expected(world, tp, ep, rank)


def test_layout_errors_name_the_option():
    with pytest.raises(DistError, match=r"^--tp 3 does not divide the world size 4$"):
        mesh_groups(4, 3, 1)
    with pytest.raises(DistError, match=r"^--ep 4 does not divide the world size 6$"):
        mesh_groups(6, 2, 4)
    with pytest.raises(DistError, match="--tp 2 does not divide the world size 1"):
        init(tp=2, device="cpu")


def test_launch_env():
    assert LaunchEnv.from_env({}) == LaunchEnv(0, 1, 0)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}
    assert LaunchEnv.from_env(env) == LaunchEnv(5, 8, 1)
    with pytest.raises(DistError, match="WORLD_SIZE=8 but RANK, MASTER_PORT unset; launch with torchrun"):
        LaunchEnv.from_env({"WORLD_SIZE": "8", "MASTER_ADDR": "n0"})
    with pytest.raises(DistError, match="bad torchrun environment"):
        LaunchEnv.from_env({"WORLD_SIZE": "two"})


def test_single_process_mesh_is_trivial(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    mesh = init(device="cpu")
    assert (mesh.rank, mesh.world_size, mesh.dp_size, mesh.tp_size, mesh.ep_size) == (0, 1, 1, 1, 1)
    assert (mesh.tp_rank, mesh.dp_rank, mesh.ep_rank, mesh.distributed) == (0, 0, 0, False)
    assert mesh.tp_group is None and mesh.groups == {}
    mesh.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", sorted(CASES))
def test_gloo_mesh_under_torchrun(tmp_path, world):
    ports = ",".join(str(_free_port()) for _ in CASES[world])
    env = dict(os.environ, OMP_NUM_THREADS="1", ASCEND_DEVICE="cpu", MESH_OUT=str(tmp_path), MESH_PORTS=ports)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(got) == len(CASES[world])
        for (tp, ep), seen in zip(CASES[world], got):
            assert seen["ranks"] == {"rank": rank, "tp_rank": rank % tp, "dp_rank": rank // tp,
                                     "ep_rank": rank % ep, "dp_size": world // tp}
            assert seen["members"] == expected(world, tp, ep, rank), (tp, ep)
            assert seen["world_sum"] == world * (world - 1) // 2


def _worker() -> None:
    """One torchrun worker: for each (tp, ep) build the mesh, probe every group, tear it down."""
    import torch
    import torch.distributed as dist

    world, results = int(os.environ["WORLD_SIZE"]), []
    for i, (tp, ep) in enumerate(CASES[world]):
        if i:  # torchrun's store still holds the first job's keys: later meshes rendezvous on a fresh store
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
            os.environ["MASTER_PORT"] = os.environ["MESH_PORTS"].split(",")[i]
        mesh = init(tp=tp, ep=ep, timeout_s=30)
        one_hot = torch.zeros(world)
        one_hot[mesh.rank] = 1
        members = {}
        for kind, group in mesh.groups.items():
            mask = one_hot.clone()
            dist.all_reduce(mask, group=group)  # sums one-hot rows: exactly the ranks in this group
            members[kind] = [r for r in range(world) if mask[r] == 1]
        total = torch.tensor([float(mesh.rank)])
        dist.all_reduce(total)
        results.append({"ranks": {"rank": mesh.rank, "tp_rank": mesh.tp_rank, "dp_rank": mesh.dp_rank,
                                  "ep_rank": mesh.ep_rank, "dp_size": mesh.dp_size},
                        "members": members, "world_sum": int(total.item())})
        mesh.destroy()
        assert not dist.is_initialized()
    with open(os.path.join(os.environ["MESH_OUT"], f"rank{mesh.rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _worker()
