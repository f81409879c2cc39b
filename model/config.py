"""`ModelConfig`: every DeepSeek-V4 hyper-parameter, under the official `ModelArgs` field names.

Three spellings of the same configuration exist in the wild and `ModelConfig.from_hf` reads all of them:

* the official HF `config.json` shipped with the checkpoints (`hidden_size`, `num_hidden_layers`,
  `compress_ratios` with one trailing 0 per MTP layer, `num_hash_layers`, `rope_scaling`, ...);
* the HF transformers spelling (`layer_types`, `compress_rates`, `mlp_layer_types`, `rope_parameters`);
* the `inference/config.json` spelling, which is the `ModelArgs` field names themselves.

`to_hf_dict()` writes the first spelling, so a synthetic checkpoint's config.json looks like the real one.
Here `compress_ratios` holds one entry per *main* layer; MTP layers are always window-only (ratio 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ascend.errors import AscendDeployError, read_json_object

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "WEIGHT_FORMATS", "EXPERT_FORMATS"]

# Storage formats a quantisable Linear may hold (see model/linear.py).
WEIGHT_FORMATS = ("fp8", "bf16", "int8")
EXPERT_FORMATS = ("fp4", "fp8", "bf16", "int8")
COMPRESS_RATIOS = (0, 4, 128)
SCORE_FUNCS = ("sqrtsoftplus",)   # the only routing score V4 uses (kernels.gate_topk)

# HF transformers layer-type labels -> compression ratio.
_LAYER_TYPE_TO_RATIO = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}


class ConfigError(AscendDeployError):
    """A model configuration that is inconsistent or cannot be read."""


@dataclass
class ModelConfig:
    """DeepSeek-V4 hyper-parameters (defaults: V4-Flash). Field names match the official `ModelArgs`."""

    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_heads: int = 64
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # attention (single shared 512-dim KV head)
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = field(
        default_factory=lambda: (0, 0) + (4, 128) * 20 + (4,))
    # RoPE / YaRN (YaRN only on compressed layers, with compress_rope_theta)
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536
    rope_theta: float = 10000.0
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    # lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # manifold-constrained hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # multi-token prediction
    n_mtp_layers: int = 1
    # storage formats: `dtype` for attention / shared-expert / MTP projections, `expert_dtype` for routed experts
    expert_dtype: str = "fp4"
    dtype: str = "fp8"
    max_seq_len: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    # simulate the quantisation-aware-training round trips (FP8 KV, FP4 indexer) as the official model does
    quant_sim: bool = True
    # round fp8 / fp4 projections' inputs to FP8 per 128 (the official FP8 / FP4 GEMMs' activation quantisation)
    act_quant: bool = False

    def __post_init__(self) -> None:
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        self.validate()

    # ----------------------------------------------------------------- per-layer facts
    def compress_ratio(self, layer_id: int) -> int:
        """Compression ratio of layer `layer_id`; ids >= n_layers are MTP layers (window-only)."""
        return self.compress_ratios[layer_id] if layer_id < self.n_layers else 0

    def is_hash_layer(self, layer_id: int) -> bool:
        """Whether the MoE of layer `layer_id` routes by token id (`tid2eid`) instead of by score."""
        return layer_id < self.n_hash_layers

    def tp_split_problem(self, tp: int) -> str | None:
        """Why `tp` tensor-parallel ranks cannot split this model, or None. Tensor parallelism splits the attention
        heads, the output groups, the indexer heads and the vocabulary evenly, and each FP8 projection it splits on
        whole 128-row scale blocks (one rule for the planner and the converter)."""
        from model.quant import FP8_BLOCK

        for name in ("o_groups", "n_heads", "index_n_heads", "vocab_size"):
            if getattr(self, name) % tp:
                return f"tp={tp} must divide {name}={getattr(self, name)}"
        if self.dtype == "fp8":
            split = self.o_groups * self.o_lora_rank
            for what, rows in (("wq_b rows", self.n_heads * self.head_dim), ("wo_a rows", split),
                               ("indexer wq_b rows", self.index_n_heads * self.index_head_dim),
                               ("wo_b columns", split)):
                if rows // tp % FP8_BLOCK:
                    return (f"tp={tp} splits {what} ({rows}) into {rows // tp}, not a multiple of the {FP8_BLOCK}-wide "
                            f"FP8 scale blocks")
        return None

    @property
    def n_hc_mix(self) -> int:
        """Rows of `hc_*_fn`: hc pre weights + hc post weights + an hc x hc combination matrix."""
        return (2 + self.hc_mult) * self.hc_mult

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that breaks an invariant of the architecture."""

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"model config: {name} = {getattr(self, name, '?')!r}, expected {expected}")

        for name in ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
                     "n_activated_experts", "q_lora_rank", "head_dim", "rope_head_dim", "o_groups",
                     "o_lora_rank", "window_size", "index_n_heads", "index_head_dim", "index_topk",
                     "hc_mult", "hc_sinkhorn_iters", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, "a positive integer")
        for name in ("n_hash_layers", "n_mtp_layers"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, name, "an integer >= 0")
        for name in ("route_scale", "swiglu_limit", "norm_eps", "hc_eps", "rope_theta", "compress_rope_theta",
                     "rope_factor", "beta_fast", "beta_slow", "original_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool), name, "a number")
        need(self.n_shared_experts == 1, "n_shared_experts", "1 (one shared expert per MoE layer)")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"<= n_routed_experts ({self.n_routed_experts})")
        need(self.n_hash_layers <= self.n_layers, "n_hash_layers", f"<= n_layers ({self.n_layers})")
        need(self.score_func in SCORE_FUNCS, "score_func", f"one of {SCORE_FUNCS}")
        need(self.dtype in WEIGHT_FORMATS, "dtype", f"one of {WEIGHT_FORMATS}")
        need(self.expert_dtype in EXPERT_FORMATS, "expert_dtype", f"one of {EXPERT_FORMATS}")
        need(self.route_scale > 0, "route_scale", "> 0")
        need(self.swiglu_limit >= 0, "swiglu_limit", ">= 0 (0 disables the clamp)")
        need(self.norm_eps > 0 and self.hc_eps > 0, "norm_eps", "> 0 (and hc_eps > 0)")
        # compression schedule
        need(len(self.compress_ratios) == self.n_layers, "compress_ratios",
             f"{self.n_layers} entries (one per main layer), got {len(self.compress_ratios)}")
        bad = sorted({r for r in self.compress_ratios if r not in COMPRESS_RATIOS})
        need(not bad, "compress_ratios", f"values in {COMPRESS_RATIOS}, got {bad}")
        # attention geometry
        need(self.rope_head_dim % 2 == 0, "rope_head_dim", "even (interleaved RoPE pairs)")
        need(self.rope_head_dim < self.head_dim, "rope_head_dim", f"< head_dim ({self.head_dim})")
        need((self.head_dim - self.rope_head_dim) % 64 == 0, "head_dim",
             f"head_dim - rope_head_dim a multiple of 64 (FP8 KV simulation blocks); rope_head_dim = "
             f"{self.rope_head_dim}")
        need(self.n_heads % self.o_groups == 0, "n_heads", f"a multiple of o_groups ({self.o_groups})")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0 and self.index_head_dim % 32 == 0,
             "index_head_dim", "a power of two >= 32 (Hadamard rotation, FP4 blocks of 32)")
        need(self.index_head_dim > self.rope_head_dim, "index_head_dim", f"> rope_head_dim ({self.rope_head_dim})")
        # FP4 packs two values per byte with one scale per 32 inputs, so expert input dims must split evenly
        if self.expert_dtype == "fp4":
            for name in ("dim", "moe_inter_dim"):
                need(getattr(self, name) % 32 == 0, name, "a multiple of 32 (FP4 scale blocks)")
        # act_quant rounds every fp8 / fp4 projection input in blocks of 128
        if self.act_quant:
            for name in ("dim", "q_lora_rank", "o_lora_rank", "moe_inter_dim"):
                need(getattr(self, name) % 128 == 0, name, "a multiple of 128 with act_quant (FP8 input blocks)")

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The published `flash` / `pro` configurations, or `tiny` for tests; `overrides` replace fields."""
        if name not in PRESETS:
            raise ConfigError(f"model preset {name!r}: expected one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        if "n_layers" in overrides and "compress_ratios" not in overrides:
            # a reduced-depth model keeps the first layers of the published schedule
            schedule = tuple(values.get("compress_ratios", cls().compress_ratios))
            overrides["compress_ratios"] = schedule[: overrides["n_layers"]]
            if len(schedule) < overrides["n_layers"]:
                raise ConfigError(f"model preset {name!r}: n_layers = {overrides['n_layers']}, expected <= "
                                  f"{len(schedule)}")
            overrides.setdefault("n_hash_layers", min(values.get("n_hash_layers", 3), overrides["n_layers"]))
        values.update(overrides)
        return cls(**values)

    # ----------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Read a config.json (path to the file or its directory, or the parsed dict) in any known spelling."""
        if isinstance(source, Mapping):
            raw, origin = dict(source), "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            raw = read_json_object(path, ConfigError, "cannot read model config")
            origin = str(path)
        try:
            values = _values_from_hf(raw, origin)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{origin}: unreadable DeepSeek-V4 config ({type(e).__name__}: {e})") from None
        values.update(overrides)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{origin}: unknown model config fields {sorted(unknown)}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{origin}: {str(e).removeprefix('model config: ')}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as the official HF `config.json` content (MTP layers appended to compress_ratios as 0)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "expert_dtype": self.expert_dtype,
            "hc_eps": self.hc_eps,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.dim,
            "initializer_range": 0.02,
            "index_head_dim": self.index_head_dim,
            "index_n_heads": self.index_n_heads,
            "index_topk": self.index_topk,
            "max_position_embeddings": self.max_seq_len,
            "moe_intermediate_size": self.moe_inter_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": True,
            "num_attention_heads": self.n_heads,
            "num_experts_per_tok": self.n_activated_experts,
            "num_hidden_layers": self.n_layers,
            "num_hash_layers": self.n_hash_layers,
            "num_key_value_heads": 1,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.rope_head_dim,
        }
        quant = _QUANT_CONFIGS.get(self.dtype)
        if quant is not None:
            out["quantization_config"] = dict(quant)
        out.update({
            "rms_norm_eps": self.norm_eps,
            "rope_scaling": {
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "type": "yarn",
            },
            "rope_theta": self.rope_theta,
            "routed_scaling_factor": self.route_scale,
            "scoring_func": self.score_func,
            "sliding_window": self.window_size,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "compress_rope_theta": self.compress_rope_theta,
            "compress_ratios": list(self.compress_ratios) + [0] * self.n_mtp_layers,
        })
        return out


# quantization_config blocks per non-expert weight format ("bf16": no block)
_QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "fp8": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128]},
    "int8": {"activation_scheme": "dynamic", "fmt": "int8", "quant_method": "int8",
             "scale_fmt": "float32", "weight_granularity": "per_channel"},
}

# HF key -> ModelConfig field, for keys that only change name.
_HF_RENAMES = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers", "num_hash_layers": "n_hash_layers", "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale", "swiglu_limit": "swiglu_limit", "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim", "qk_rope_head_dim": "rope_head_dim", "rms_norm_eps": "norm_eps",
    "o_groups": "o_groups", "o_lora_rank": "o_lora_rank", "sliding_window": "window_size",
    "compress_rope_theta": "compress_rope_theta", "rope_theta": "rope_theta", "compress_ratios": "compress_ratios",
    "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim", "index_topk": "index_topk",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
    "num_nextn_predict_layers": "n_mtp_layers", "expert_dtype": "expert_dtype",
    "max_position_embeddings": "max_seq_len", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}
_FIELD_NAMES = {f.name for f in dataclasses.fields(ModelConfig)}
# Fields every config file must state (in any spelling): they fix tensor shapes or which tokens attention sees, so
# a missing one must not quietly take V4-Flash's value. The rest (norm eps, RoPE, mHC settings, ...) have the
# published values of both models as defaults.
_REQUIRED = ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts", "n_activated_experts",
             "q_lora_rank", "head_dim", "o_groups", "o_lora_rank", "window_size", "index_n_heads", "index_head_dim",
             "index_topk", "compress_ratios")
_HF_NAMES = ({field_: key for key, field_ in _HF_RENAMES.items()}
             | {"compress_ratios": "compress_ratios (or layer_types)"})


def _values_from_hf(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """Map any of the three config spellings onto ModelConfig field values."""
    inference_spelling = "dim" in raw and "hidden_size" not in raw
    if inference_spelling:
        # inference/config.json: ModelArgs names already; drop keys that only the official runtime uses
        values = {k: v for k, v in raw.items() if k in _FIELD_NAMES}
    else:
        values = {field_: raw[key] for key, field_ in _HF_RENAMES.items() if key in raw and raw[key] is not None}
        quant = raw.get("quantization_config") or {}
        values["dtype"] = {"fp8": "fp8", "int8": "int8"}.get(quant.get("quant_method"), "bf16")
        if raw.get("expert_dtype") is None:
            # a checkpoint without FP4 experts stores them like every other projection
            values["expert_dtype"] = values["dtype"]
        rope = _yarn_parameters(raw)
        for key, field_ in (("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
                            ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if rope.get(key) is not None:
                values[field_] = rope[key]
        if "qk_rope_head_dim" not in raw and raw.get("partial_rotary_factor") is not None:
            # transformers spelling: the RoPE width as a fraction of head_dim
            head_dim = int(raw.get("head_dim", ModelConfig.head_dim))
            values["rope_head_dim"] = round(head_dim * raw["partial_rotary_factor"])
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        # per-layer schedules in the transformers spelling
        if raw.get("layer_types") is not None:
            rates = {**{k: v for k, v in _LAYER_TYPE_TO_RATIO.items() if v}, **(raw.get("compress_rates") or {})}
            rates["sliding_attention"] = 0
            values["compress_ratios"] = [rates[t] for t in raw["layer_types"]]
        if raw.get("mlp_layer_types") is not None:
            kinds = list(raw["mlp_layer_types"])
            n_hash = sum(1 for k in kinds if k == "hash_moe")
            if kinds[:n_hash] != ["hash_moe"] * n_hash:
                raise ValueError("mlp_layer_types: hash_moe layers must come first")
            values["n_hash_layers"] = n_hash
    missing = [name if inference_spelling else _HF_NAMES[name] for name in _REQUIRED if name not in values]
    if missing:
        raise ConfigError(f"{origin}: missing {', '.join(missing)} (a DeepSeek-V4 config states every field that "
                          f"fixes a tensor shape or the attention pattern)")
    ratios = list(values["compress_ratios"])
    n_layers = int(values["n_layers"])
    extra = ratios[n_layers:]
    if any(r != 0 for r in extra):
        raise ValueError(f"compress_ratios entries after the {n_layers} main layers (MTP) must be 0, got {extra}")
    values["compress_ratios"] = tuple(ratios[:n_layers])
    return values


def _yarn_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """YaRN settings from `rope_scaling` (official) or `rope_parameters` (transformers, flat or nested)."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if isinstance(rope.get("compress"), dict):
        rope = rope["compress"]
    return rope


_PRO_RATIOS = (128, 128) + (4, 128) * 29 + (4,)

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V4-Flash (284B total / 13B active): the dataclass defaults
    "flash": {},
    # DeepSeek-V4-Pro (1.6T total / 49B active)
    "pro": dict(dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
                n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5, index_topk=1024,
                compress_ratios=_PRO_RATIOS),
    # every structural feature at test size: window-only, CSA and HCA layers, 1 hash + 3 score-routed MoE
    # layers, mHC with 4 streams, one MTP layer; every quantised dimension a multiple of 128 and every
    # head / group / expert count divisible by 2 and 4, so TP and EP splits of 2 and 4 keep whole blocks.
    "tiny": dict(vocab_size=1024, dim=256, moe_inter_dim=256, n_layers=4, n_hash_layers=1, n_heads=8,
                 n_routed_experts=8, n_activated_experts=3, route_scale=1.5, q_lora_rank=128, head_dim=128,
                 rope_head_dim=64, o_groups=4, o_lora_rank=128, window_size=16,
                 compress_ratios=(0, 4, 128, 4), index_n_heads=4, index_head_dim=128, index_topk=4,
                 max_seq_len=512),
}
