"""Multi-process inference on CPU/Gloo through `ascend run`: sharded runs equal one process, failures end the job.

One tiny synthetic checkpoint is converted for four layouts (1 rank; TP=2 x EP=2 with redundant experts;
DP=2 x EP=2 with redundant experts; DP=2 x TP=2 x EP=4) and every run's greedy tokens and logits are
compared with the single-process run on the same requests.
"""

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ascend.cli import main as cli
from ascend.launch import LaunchError, check_checkpoint
from model.chat import encode_messages
from model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TURN = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 21}'}]
REQUESTS = [{"id": "short", "messages": [{"role": "user", "content": "Hi"}]},
            {"id": "tools", "messages": TOOL_TURN, "tools": TOOLS},
            {"id": "long", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Tell me a story about a robot who paints."}],
             "max_new_tokens": 3}]
LAYOUTS = {"1": (1, 1, 1, 0), "tp2ep2": (2, 2, 2, 2), "dp2ep2": (2, 1, 2, 2), "dp2tp2ep4": (4, 2, 4, 4)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    cli(["synth", "--preset", "tiny", "--layers", "2", "--out", str(root / "src")])  # window + CSA layer
    for name, (world, tp, ep, redundant) in LAYOUTS.items():
        cli(["convert", "--hf", str(root / "src"), "--out", str(root / name), "--tp", str(tp), "--ep", str(ep),
             "--redundant", str(redundant)])
    (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return root


def ascend_run(ckpt: Path, nproc: int, *args: str, timeout: float = 90) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ascend.cli", "run", "--ckpt", str(ckpt), "--nproc", str(nproc),
                        "--device", "cpu", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def generate_json(ckpt: Path, nproc: int, work: Path, *extra: str) -> dict:
    rc, out, err, _ = ascend_run(ckpt, nproc, "--input", str(work / "requests.jsonl"), "--max-new-tokens", "4",
                                 "--json", "--dump-logits", *extra)
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(work):
    return generate_json(work / "1", 1, work)


def assert_same(run: dict, ref: dict) -> None:
    assert [r["id"] for r in run["results"]] == ["short", "tools", "long"]
    for got, want in zip(run["results"], ref["results"]):
        assert got["tokens"] == want["tokens"], got["id"]
        # float32 sums in another order (sharded matmuls, all-reduce): differences ~1e-4 of the logit scale
        got_logits, want_logits = torch.tensor(got["logits"]), torch.tensor(want["logits"])
        scale = want_logits.abs().max()
        assert (got_logits - want_logits).abs().max() <= 1e-3 * scale, got["id"]


def test_reference_run_renders_tools_and_limits(reference, work):
    tok = load_tokenizer(work / "1")
    tools_prompt = encode_messages([{"role": "system", "content": "", "tools": TOOLS}] + TOOL_TURN)
    results = {r["id"]: r for r in reference["results"]}
    assert results["tools"]["prompt_tokens"] == len(tok.encode(tools_prompt))
    assert results["long"]["completion_tokens"] == 3 and results["short"]["completion_tokens"] == 4
    assert all(r["ttft_s"] > 0 and r["tokens_per_s"] > 0 and "message" in r for r in reference["results"])


def test_tp2_ep2_redundant_equals_one_process(work, reference):
    run = generate_json(work / "tp2ep2", 2, work)
    assert (run["tp"], run["ep"], run["redundant_experts"]) == (2, 2, 2)
    assert_same(run, reference)


def test_dp2_ep2_all_to_all_equals_one_process(work, reference):
    # batches of one: dp group 0 serves two rounds, group 1 one round and then idle steps for the exchange
    run = generate_json(work / "dp2ep2", 2, work, "--max-batch", "1")
    assert (run["dp"], run["ep"], run["expert_exchange"]) == (2, 2, "alltoall")
    assert_same(run, reference)


def test_act_quant_reaches_every_rank(work, reference):
    """--act-quant (the official code's FP8 rounding of fp8 / fp4 projection inputs) changes the logits of the
    synthetic fp8 / fp4 checkpoint, and a TP=2 x EP=2 run with it equals one process with it."""
    one = generate_json(work / "1", 1, work, "--act-quant")
    first, ref_first = torch.tensor(one["results"][0]["logits"][0]), torch.tensor(reference["results"][0]["logits"][0])
    assert (first - ref_first).abs().max() > 1e-3 * ref_first.abs().max()
    assert_same(generate_json(work / "tp2ep2", 2, work, "--act-quant"), one)


@pytest.mark.slow
def test_four_ranks_dp2_tp2_ep4_all_gather_equals_one_process(work, reference):
    run = generate_json(work / "dp2tp2ep4", 4, work, "--moe-exchange", "allgather")
    assert (run["dp"], run["tp"], run["ep"], run["expert_exchange"]) == (2, 2, 4, "allgather")
    assert_same(run, reference)


def test_failing_rank_ends_every_rank_with_its_message(work):
    rc, out, err, elapsed = ascend_run(work / "dp2ep2", 2, "--prompt", "hi", "--prompt", "there",
                                       "--inject-failure", "1:generate", "--dist-timeout", "60", timeout=60)
    assert rc != 0
    assert "rank 1: RuntimeError: injected failure at generate" in err
    assert elapsed < 45  # torchrun stops rank 0, which is blocked in an expert exchange with rank 1


def test_bad_shard_on_one_rank_ends_the_job(work, tmp_path):
    """Same size (passes the manifest check), unreadable header: rank 1 fails while loading, rank 0 waits for it."""
    shard = next((work / "tp2ep2" / "rank-00001").glob("*.safetensors"))
    data = shard.read_bytes()
    try:
        shard.write_bytes(b"\xff" * 16 + data[16:])
        rc, _, err, elapsed = ascend_run(work / "tp2ep2", 2, "--prompt", "hi", timeout=60)
    finally:
        shard.write_bytes(data)
    assert rc != 0 and "rank 1: " in err and elapsed < 45


def test_mismatched_launch_is_refused_before_loading(work, tmp_path):
    rc, _, err, _ = ascend_run(work / "1", 2, "--prompt", "hi")
    assert rc == 2 and "converted for 1 ranks" in err  # `ascend run` refuses before starting torchrun
    with pytest.raises(LaunchError, match="shards are for 2 ranks but 1"):
        check_checkpoint(work / "tp2ep2", 0, 1)
    with pytest.raises(LaunchError, match="differs from the plan"):
        check_checkpoint(work / "tp2ep2", 0, 2, plan_path=work / "dp2ep2" / "plan.json")
    shard = next((work / "dp2ep2" / "rank-00001").glob("*.safetensors"))
    data = shard.read_bytes()
    try:
        shard.write_bytes(data[:-8])
        with pytest.raises(LaunchError, match="rank 1 shard has"):
            check_checkpoint(work / "dp2ep2", 1, 2)
    finally:
        shard.write_bytes(data)


def test_interactive_chat_with_a_tool_result(work):
    """One process, no torchrun: stdin drives the conversation; /tool feeds a result back."""
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "launch.py"), "--ckpt", str(work / "1"), "--device",
                        "cpu", "--interactive", "--max-new-tokens", "3"], input='hi\n/tool {"celsius": 21}\n/exit\n',
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count(">>> ") == 3 and p.stderr.count("reply kept as plain text") == 2


def test_interactive_two_ranks_outlive_the_collective_timeout_and_end_at_eof(work):
    """2 ranks under torchrun: the user answers after longer than --dist-timeout (the other rank waits on its own
    group), a line that would outgrow --max-len is refused and the chat goes on, and the end of input ends it."""
    p = subprocess.Popen([sys.executable, "-m", "ascend.cli", "run", "--ckpt", str(work / "tp2ep2"), "--nproc", "2",
                          "--device", "cpu", "--interactive", "--max-new-tokens", "2", "--max-len", "64",
                          "--dist-timeout", "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        seen = b""
        while not seen.endswith(b">>> "):     # the first prompt: both ranks are loaded and waiting for the user
            ready, _, _ = select.select([p.stdout], [], [], 120)
            assert ready, "no prompt within 120 s"
            seen += os.read(p.stdout.fileno(), 4096)
        time.sleep(6)                          # longer than --dist-timeout
        out, err = p.communicate(("hi\n" + "word " * 80 + "\n").encode(), timeout=120)    # then end of input
    finally:
        p.kill()
    err = err.decode()
    assert p.returncode == 0, err[-3000:]
    assert "exceeds --max-len 64: /clear to start over" in err and (seen + out).count(b">>> ") == 3


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(work, tmp_path):
    import tokenizers

    from model.tokenizer import write_synthetic_tokenizer
    big = write_synthetic_tokenizer(tmp_path, 1024)
    grown = tokenizers.Tokenizer.from_file(str(big))
    grown.add_tokens([f"extra{i}" for i in range(1024)])      # more ids than the tiny model's 1,024 embeddings
    grown.save(str(big))
    n_ids = grown.get_vocab_size(with_added_tokens=True)
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "launch.py"), "--ckpt", str(work / "1"), "--device",
                        "cpu", "--tokenizer", str(big), "--prompt", "hi"], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert p.returncode == 2 and f"the tokenizer has {n_ids} ids, the model's vocabulary 1024" in p.stderr


def test_shut_down_keeps_nccl_communicators_after_captured_collectives(monkeypatch):
    """Ranks meet at a barrier, then tear down their groups, except when captured graphs hold collectives (NCCL's
    teardown then hangs: pytorch/pytorch#115388); a single process has nothing to wait for."""
    from ascend import serve
    calls = []

    class Mesh:
        def __init__(self, distributed):
            self.distributed = distributed
            self.device = type("D", (), {"synchronize": lambda _: calls.append("sync")})()

        def destroy(self):
            calls.append("destroy")

    monkeypatch.setattr(serve.dist, "barrier", lambda: calls.append("barrier"))
    for distributed, captured, expected in ((True, False, ["sync", "barrier", "destroy"]),
                                            (True, True, ["sync", "barrier"]), (False, False, ["destroy"])):
        calls.clear()
        serve.shut_down(Mesh(distributed), captured)
        assert calls == expected
