"""scripts/bench_launch.py's roofline: the bytes a decode step must read."""

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from tests.conftest import load_script


def test_a_step_reads_embedding_rows_not_the_table():
    bench = load_script("bench_launch")
    cfg = ModelConfig.preset("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())
    row = params["embed.weight"][0].nbytes
    experts = sum(p.nbytes for n, p in params.items() if ".experts." in n and not n.startswith("mtp."))
    rest = sum(p.nbytes for n, p in params.items()
               if ".experts." not in n and not n.startswith("mtp.") and n != "embed.weight")
    k_of_e = cfg.n_activated_experts / cfg.n_routed_experts
    for batch in (1, 4):
        expect = rest + batch * row + experts * (1 - (1 - k_of_e) ** batch)
        assert bench.weight_bytes_per_step(model, batch) == int(expect)
