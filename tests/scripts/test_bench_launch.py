"""scripts/bench_launch.py: the roofline's bytes a decode step must read, and the greedy pick of its timed steps."""

import dataclasses

import torch

from ascend.device import get_device
from model.config import ModelConfig
from model.kernels import REFERENCE, use_kernels
from model.transformer import Transformer, init_random_
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


def test_each_timed_step_picks_with_the_table_or_the_given_pick():
    """The timed greedy steps pick with the model's kernels.argmax (as the launcher does), or with `pick`
    (`--pick torch`): every step's token, warm-up included."""
    bench = load_script("bench_launch")
    cfg = ModelConfig.preset("tiny", n_layers=2, max_seq_len=64)
    model = init_random_(Transformer(cfg, dtype=torch.float32), 0).eval()
    calls = {"table": 0, "given": 0}

    def counted(name):
        def pick(logits):
            calls[name] += 1
            return logits.argmax(-1)
        return pick

    use_kernels(model, dataclasses.replace(REFERENCE, argmax=counted("table")))
    device = get_device("cpu")
    bench.run_case(model, device, prompt_len=8, batch=2, steps=3, chunk=8, graphs=False)
    assert calls == {"table": 2 + 3, "given": 0}          # warm-up, then the timed steps
    bench.run_case(model, device, prompt_len=8, batch=2, steps=3, chunk=8, graphs=False, pick=counted("given"))
    assert calls == {"table": 5, "given": 5}
