"""mHC: parameters under checkpoint names, Sinkhorn doubly stochastic, wrapper and head against the spec's formulas."""

import torch
from torch import nn

from model.config import ModelConfig
from model.hyper import HyperConnection, HyperHead, expand_streams
from model.kernels import REFERENCE

CFG = ModelConfig.preset("tiny")
N, D = CFG.hc_mult, CFG.dim


def _owner(seed: int = 0):
    owner = nn.Module()
    hc = HyperConnection(owner, "attn", CFG, REFERENCE)
    head = HyperHead(owner, CFG, REFERENCE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in owner.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if name.endswith("_fn") else 1.0))
    return owner, hc, head


def test_parameter_names_shapes_dtypes():
    owner, _, _ = _owner()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in owner.state_dict().items()}
    assert shapes == {"hc_attn_fn": ((24, 4 * D), torch.float32), "hc_attn_base": ((24,), torch.float32),
                      "hc_attn_scale": ((3,), torch.float32), "hc_head_fn": ((4, 4 * D), torch.float32),
                      "hc_head_base": ((4,), torch.float32), "hc_head_scale": ((1,), torch.float32)}


def test_sinkhorn_is_doubly_stochastic():
    owner, _, _ = _owner(1)
    x = torch.randn(3, 7, N, D) * 5                       # the mixes are scale-free: RMS-normalised
    _, post, comb = REFERENCE.hc_pre(x, owner.hc_attn_fn, owner.hc_attn_scale, owner.hc_attn_base,
                                     CFG.hc_sinkhorn_iters, CFG.hc_eps, CFG.norm_eps)
    assert comb.shape == (3, 7, N, N) and (comb >= 0).all()
    torch.testing.assert_close(comb.sum(-1), torch.ones(3, 7, N), atol=1e-3, rtol=0)
    torch.testing.assert_close(comb.sum(-2), torch.ones(3, 7, N), atol=1e-3, rtol=0)
    assert ((post > 0) & (post < 2)).all()


def _spec_sublayer(owner, x, f):
    """deepseek-v4.md §5 written out per token in float64."""
    fn, base, scale = (owner.hc_attn_fn.double(), owner.hc_attn_base.double(), owner.hc_attn_scale.double())
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(x.size(0)):
        for s in range(x.size(1)):
            X = x[b, s].double()
            v = X.flatten()
            m = (fn @ v) / torch.sqrt(v.square().mean() + CFG.norm_eps)
            pre = torch.sigmoid(m[:N] * scale[0] + base[:N]) + CFG.hc_eps
            post = 2 * torch.sigmoid(m[N:2 * N] * scale[1] + base[N:2 * N])
            c = torch.softmax((m[2 * N:] * scale[2] + base[2 * N:]).view(N, N), -1) + CFG.hc_eps
            c = c / (c.sum(0, keepdim=True) + CFG.hc_eps)
            for _ in range(CFG.hc_sinkhorn_iters - 1):
                c = c / (c.sum(1, keepdim=True) + CFG.hc_eps)
                c = c / (c.sum(0, keepdim=True) + CFG.hc_eps)
            y = f((pre[:, None] * X).sum(0))
            for j in range(N):
                out[b, s, j] = post[j] * y + sum(c[k, j] * X[k] for k in range(N))
    return out


def test_sublayer_wrapper_matches_spec():
    owner, hc, _ = _owner(2)
    x = torch.randn(2, 3, N, D)
    w = torch.randn(D, D) / D ** 0.5
    got = hc(owner, x, lambda y: torch.tanh(y @ w.T.to(y.dtype)))
    want = _spec_sublayer(owner, x, lambda y: torch.tanh(y @ w.T.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_head_matches_spec_and_expand():
    owner, _, head = _owner(3)
    h = torch.randn(2, 3, D)
    x = expand_streams(h, N)
    assert x.shape == (2, 3, N, D) and all(torch.equal(x[:, :, k], h) for k in range(N))
    x = x + torch.randn_like(x) * 0.1
    v = x.flatten(2).double()
    m = (v @ owner.hc_head_fn.double().T) / torch.sqrt(v.square().mean(-1, keepdim=True) + CFG.norm_eps)
    pre = torch.sigmoid(m * owner.hc_head_scale.double() + owner.hc_head_base.double()) + CFG.hc_eps
    torch.testing.assert_close(head(owner, x).double(), (pre.unsqueeze(-1) * x.double()).sum(2), rtol=1e-5, atol=1e-5)
