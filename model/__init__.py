"""The DeepSeek-V4 model in PyTorch: config, quantisation formats, layers in forward order, cache, generation.

    from model import ModelConfig, Transformer, generate, SamplingParams
    cfg = ModelConfig.from_hf("path/to/checkpoint")          # or ModelConfig.preset("tiny")
    model = Transformer(cfg)                                  # ParallelContext(), kernels=REFERENCE, bfloat16
    model.load_weights(state_dict)                            # official (or HF-style) tensor names
    completions = generate(model, [prompt_ids], SamplingParams(max_new_tokens=64))
"""

from model.cache import KVCache, cache_bytes_per_token
from model.config import ConfigError, ModelConfig
from model.generate import GenerationError, Sampler, SamplingParams, decode_step, generate, prefill
from model.kernels import REFERENCE, Kernels
from model.linear import ColumnParallelLinear, Linear, RowParallelLinear
from model.parallel import ParallelContext, ParallelError
from model.transformer import Transformer, WeightsError, init_random_

__all__ = [
    "ModelConfig", "ConfigError", "Transformer", "WeightsError", "init_random_", "KVCache", "cache_bytes_per_token",
    "Kernels", "REFERENCE", "ParallelContext", "ParallelError", "Linear", "ColumnParallelLinear",
    "RowParallelLinear", "generate", "prefill", "decode_step", "Sampler", "SamplingParams", "GenerationError",
]
