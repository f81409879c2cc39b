"""scripts/bench_plan.py's measure of how close a placement gets to the lower bound."""

import numpy as np

from tests.conftest import load_script


def test_bound_gap_of_a_layer_without_load_is_zero():
    """A layer no token routes to has peak and bound 0: it is at its bound (was NaN, which the "within 2% of the
    bound" share counted as a miss)."""
    bench = load_script("bench_plan")
    gap = bench.bound_gap(np.array([11.0, 0.0, 10.0]), np.array([10.0, 0.0, 10.0]))
    np.testing.assert_allclose(gap, [0.1, 0.0, 0.0])
