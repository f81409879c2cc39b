"""Tensor names: the official spelling (== model/ module paths) and the HF-style spelling, both ways.

Official: `layers.3.attn.wq_b.scale`, `layers.3.ffn.experts.7.w1.weight`, `embed.weight`, `head.weight`.
HF-style: `model.` prefix (except `lm_head`), `self_attn`, `mlp`, `weight_scale_inv` for block
scales, `e_score_correction_bias`, and the Llama-style leaf names below. Mapping is component by
component (never substring replacement), so it is a bijection on every name the checkpoint holds;
tests check `to_official(to_hf(n)) == n` over the whole expected-tensor table.
"""

from __future__ import annotations

# One entry per renamed path component: official -> HF-style. Anything else is spelled the same.
_COMPONENTS = {
    "attn": "self_attn",
    "ffn": "mlp",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}
_LEAVES = {"scale": "weight_scale_inv", "bias": "e_score_correction_bias"}  # block scales; gate bias
_BACK = {v: k for k, v in _COMPONENTS.items()}
_LEAVES_BACK = {v: k for k, v in _LEAVES.items()}
_TOP = {"embed": "embed_tokens"}  # first component, official -> HF (under the `model.` prefix)
_TOP_BACK = {v: k for k, v in _TOP.items()}


def to_hf(name: str) -> str:
    """Official tensor name -> HF-style tensor name."""
    parts = name.split(".")
    if parts[0] == "head":
        return ".".join(["lm_head", *parts[1:]])
    parts[0] = _TOP.get(parts[0], parts[0])
    parts = [_COMPONENTS.get(p, p) for p in parts[:-1]] + [_LEAVES.get(parts[-1], parts[-1])]
    return ".".join(["model", *parts])


def to_official(name: str) -> str:
    """HF-style (or already official) tensor name -> official tensor name."""
    parts = name.split(".")
    if parts[0] == "lm_head":
        return ".".join(["head", *parts[1:]])
    if parts[0] != "model":
        return name  # already official
    parts = parts[1:]
    parts[0] = _TOP_BACK.get(parts[0], parts[0])
    return ".".join([_BACK.get(p, p) for p in parts[:-1]] + [_LEAVES_BACK.get(parts[-1], parts[-1])])


def is_hf_style(names) -> bool:
    """True when a checkpoint's names use the HF-style spelling."""
    return any(n.startswith(("model.", "lm_head.")) for n in names)
