"""Sharding planner: hardware-aware layout search, memory model, expert placement (EPLB), plan.json.

`make_plan(config, world_size, tp, ep, ...)` builds a `Plan` for given degrees without any hardware model
(what convert/ needs); `plan_deployment` (ascend.planner.cli) searches layouts for a hardware entry first.
"""

from ascend.planner.errors import PlanError
from ascend.planner.plan import SCHEMA_VERSION, Plan, make_plan

__all__ = ["Plan", "PlanError", "SCHEMA_VERSION", "make_plan"]
