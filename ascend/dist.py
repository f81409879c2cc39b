"""Process groups for a dp x tp x ep mesh, from torchrun's environment.

Rank layout (the Plan contract): world = dp * tp and rank = dp_rank * tp + tp_rank, so the ranks of
one tensor-parallel group are consecutive (one node's fast links). Routed experts are spread over
ep ranks with ep dividing world and ep_rank = rank % ep: an expert-parallel group is a block of ep
consecutive ranks, and the ranks holding the same experts (same ep_rank, one per block) form the
expert-replica group that averages or broadcasts those experts' weights.

Every subgroup is created collectively on every rank in the same order, as torch.distributed
requires; each rank keeps the groups it belongs to. Without torchrun (WORLD_SIZE unset or 1) the
mesh is trivial and no process group is created.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from ascend.device import Device, get_device
from ascend.errors import AscendDeployError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class DistError(AscendDeployError):
    """The parallel layout does not fit the launched world, or torchrun's environment is incomplete."""


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells each process (MASTER_ADDR/PORT are read by init_method env://)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LaunchEnv:
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
            if world > 1 and missing:
                raise DistError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; launch with torchrun")
            rank = int(env.get("RANK", "0"))
            return cls(rank, world, int(env.get("LOCAL_RANK", str(rank))))
        except ValueError as e:
            raise DistError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None


def mesh_groups(world: int, tp: int, ep: int) -> dict[str, list[list[int]]]:
    """All subgroups of each kind as rank lists, in the creation order every rank uses."""
    if tp < 1 or world % tp:
        raise DistError(f"--tp {tp} does not divide the world size {world}")
    if ep < 1 or world % ep:
        raise DistError(f"--ep {ep} does not divide the world size {world}")
    dp = world // tp
    return {
        "tp": [[d * tp + t for t in range(tp)] for d in range(dp)],
        "dp": [[d * tp + t for d in range(dp)] for t in range(tp)],
        "ep": [[b * ep + e for e in range(ep)] for b in range(world // ep)],
        "ep_replica": [[b * ep + e for b in range(world // ep)] for e in range(ep)],
    }


@dataclass
class Mesh:
    """This rank's place in the dp x tp x ep layout and its process groups (None when single-process)."""
    device: Device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1
    ep_size: int = 1
    groups: dict[str, object] = field(default_factory=dict)  # kind -> ProcessGroup containing this rank

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def tp_group(self):
        return self.groups.get("tp")

    @property
    def dp_group(self):
        return self.groups.get("dp")

    @property
    def ep_group(self):
        return self.groups.get("ep")

    @property
    def ep_replica_group(self):
        return self.groups.get("ep_replica")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def destroy(self) -> None:
        """Tear down every process group this process created (safe to call twice)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.groups = {}


def init(tp: int = 1, ep: int = 1, device: Device | str | None = None,
         timeout_s: float | None = None) -> Mesh:
    """Join the torchrun job and build the mesh; dp = world / tp.

    `timeout_s` bounds every collective and the rendezvous (default $ASCEND_DIST_TIMEOUT_S or 10 min).
    """
    env = LaunchEnv.from_env()
    device = device if isinstance(device, Device) else get_device(device)
    groups = mesh_groups(env.world_size, tp, ep)  # validate before touching the network
    if env.world_size == 1:
        return Mesh(device, tp_size=tp, ep_size=ep)

    device.set_device(env.local_rank)  # before the process group: NCCL/HCCL bind to the current device
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("ASCEND_DIST_TIMEOUT_S",
                                                                           DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():  # env:// joins the store torchrun's agent already runs at MASTER_ADDR:PORT
        dist.init_process_group(backend=device.collective_backend, init_method="env://", rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    mesh = Mesh(device, env.rank, env.world_size, env.local_rank, tp, ep)
    for kind, rank_lists in groups.items():
        mine, _ = dist.new_subgroups_by_enumeration(rank_lists, timeout=timeout, backend=device.collective_backend)
        mesh.groups[kind] = mine
    log.info("rank %d/%d: dp %d x tp %d, ep %d on %s", env.rank, env.world_size, mesh.dp_size, tp, ep,
             device.collective_backend)
    return mesh
