"""RoPE / YaRN frequencies: the published band edges, the blend, per-layer choice, relative-position property."""

import math

import torch

from model import kernels
from model.config import ModelConfig
from model.rope import Rotary, layer_frequencies, rope_frequencies


def test_plain_frequencies():
    f = rope_frequencies(64, 10000.0)
    expect = torch.tensor([10000.0 ** (-2 * k / 64) for k in range(32)])
    torch.testing.assert_close(f, expect)


def test_yarn_band_for_v4_settings():
    # base 160000, 64 dims, original context 65536, beta 32 / 1: the pair doing 32 rotations over 65536 tokens
    # sits at 15.45 and the one doing 1 rotation at 24.71, so pairs <= 15 keep their frequency, >= 25 are / 16
    plain = rope_frequencies(64, 160000.0)
    yarn = rope_frequencies(64, 160000.0, 65536, 16.0, 32, 1)
    torch.testing.assert_close(yarn[:16], plain[:16])
    torch.testing.assert_close(yarn[25:], plain[25:] / 16)
    for k in range(16, 25):
        t = (k - 15) / 10                                       # linear ramp between pairs 15 and 25
        want = plain[k] / 16 * t + plain[k] * (1 - t)
        assert math.isclose(float(yarn[k]), float(want), rel_tol=1e-6)


def test_layer_choice_and_positions():
    cfg = ModelConfig.preset("flash")
    assert cfg.compress_ratio(0) == 0 and cfg.compress_ratio(2) == 4
    torch.testing.assert_close(layer_frequencies(cfg, 0), rope_frequencies(64, 10000.0))
    torch.testing.assert_close(layer_frequencies(cfg, 3), rope_frequencies(64, 160000.0, 65536, 16.0, 32, 1))
    torch.testing.assert_close(layer_frequencies(cfg, cfg.n_layers), rope_frequencies(64, 10000.0))  # MTP
    rot = Rotary.for_layer(cfg, 2)
    pos = torch.tensor([[0, 5], [70000, 1048575]])
    cos, sin = rot(pos)
    assert cos.shape == (2, 2, 32) and cos.dtype == torch.float32
    ang = torch.outer(torch.tensor([70000.0]), rot.freqs)[0]
    torch.testing.assert_close(cos[1, 0], ang.cos())
    torch.testing.assert_close(sin[1, 0], ang.sin())


def test_relative_position_and_inverse():
    rot = Rotary(rope_frequencies(8, 10000.0))
    q, k = torch.randn(1, 1, 12), torch.randn(1, 1, 12)

    def rotated(x, p):
        cos, sin = rot(torch.tensor([[p]]))
        return kernels.rope(x, cos, sin)

    d1 = (rotated(q, 17) * rotated(k, 10)).sum()
    d2 = (rotated(q, 107) * rotated(k, 100)).sum()
    torch.testing.assert_close(d1, d2, atol=1e-4, rtol=1e-4)
    cos, sin = rot(torch.tensor([[33]]))
    torch.testing.assert_close(kernels.rope(rotated(q, 33), cos, sin, inverse=True), q, atol=1e-5, rtol=1e-5)
    assert torch.equal(rotated(q, 5)[..., :4], q[..., :4])      # only the last 8 dims rotate
