"""Shared fixtures: one tiny synthetic checkpoint per session (read-only), plans made by the planner."""

import shutil

import pytest
import torch

from ascend.planner.plan import make_plan
from convert.synth import write_synthetic
from model.config import ModelConfig


@pytest.fixture(scope="session")
def tiny_cfg():
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_cfg):
    """A tiny checkpoint in official names; tests must not modify it (copy it with `ckpt_copy`)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the suite's per-test single-thread setting
    write_synthetic(path, tiny_cfg, seed=1)
    torch.set_num_threads(threads)
    return path


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def plan_for(cfg, tp, ep, redundant=0):
    import math
    return make_plan(cfg, math.lcm(tp, ep), tp, ep, redundant=redundant)
