#!/usr/bin/env bash
# The whole path on one CPU machine, in a few minutes: install, synthesise a tiny DeepSeek-V4 checkpoint,
# plan for 2 ranks (tensor + expert parallel, redundant experts), convert, verify, launch 2 ranks on Gloo,
# chat, and check the 2-rank run against a 1-rank run of the same checkpoint (greedy tokens, then logits).
#
#   bash scripts/demo.sh            # work in ./out/demo (removed and recreated)
#   SKIP_SETUP=1 bash scripts/demo.sh   # when the package is already installed
#   SEED=3 PROMPT="..." bash scripts/demo.sh   # other random weights, another prompt
#
# The weights are RANDOM: the replies are meaningless text. What the demo proves is the machinery:
# sharding by plan, per-rank loading, TP/EP collectives, and parity with a single process.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-out/demo}
PROMPT=${PROMPT:-"Explain in one sentence why the sky is blue."}
SEED=${SEED:-0}  # seed of the random weights
export OMP_NUM_THREADS=1 ASCEND_DEVICE=cpu  # one thread per rank: 2 ranks on 2 cores
step() { printf '\n\033[1m== [%ss] %s\033[0m\n' "$(( $(date +%s) - T0 ))" "$*"; }

if [ -z "${SKIP_SETUP:-}" ]; then
  step "1/8 install: CPU torch 2.13.0 and this package (scripts/setup.sh)"
  bash scripts/setup.sh
fi

step "2/8 clean $OUT and synthesise a tiny V4 checkpoint (published layout: FP8 attention, FP4 experts, random weights)"
rm -rf "$OUT" && mkdir -p "$OUT"
ascend synth --preset tiny --seed "$SEED" --out "$OUT/hf"

step "3/8 plan 2 CPU ranks: tp 2 x ep 2, 2 redundant expert slots placed for a skewed expert load"
ascend plan --config "$OUT/hf" --hardware cpu --devices 2 --tp 2 --ep 2 --redundant 2 \
  --expert-load lognormal:1.0:0 --out "$OUT/plan-2.json" | tail -n 4
ascend plan --config "$OUT/hf" --hardware cpu --devices 1 --tp 1 --ep 1 --out "$OUT/plan-1.json" > /dev/null
python3 - "$OUT/plan-2.json" <<'PY'
import sys
from ascend.planner.plan import Plan
plan = Plan.load(sys.argv[1])
for layer in (0, 1):
    held = [plan.experts_on_rank(layer, r) for r in range(plan.world_size)]
    twice = sorted({e for e in held[0] if e in held[1]})
    print(f"MoE layer {layer}: rank 0 holds experts {held[0]}, rank 1 holds {held[1]}; on both: {twice}")
PY

step "4/8 convert: one directory of safetensors per rank, following the plan"
ascend convert --hf "$OUT/hf" --plan "$OUT/plan-2.json" --out "$OUT/ckpt-2"
ascend convert --hf "$OUT/hf" --plan "$OUT/plan-1.json" --out "$OUT/ckpt-1" > /dev/null

step "5/8 verify: manifest, completeness against the plan, hashes, and every tensor against the source"
ascend verify "$OUT/ckpt-2" --against "$OUT/hf"

step "6/8 launch 2 ranks on Gloo (torchrun): chat prompt -> V4 chat template -> greedy decoding, streamed"
python3 -c 'import sys; from model.chat import encode_messages
print("prompt as the model sees it:", repr(encode_messages([{"role": "user", "content": sys.argv[1]}])))' "$PROMPT"
echo "(random weights: the reply below is meaningless text)"
ascend run --ckpt "$OUT/ckpt-2" --nproc 2 --device cpu --prompt "$PROMPT" --max-new-tokens 24 \
  --save "$OUT/run-2.json" --dump-logits

step "7/8 the same request on 1 rank (reference)"
ascend run --ckpt "$OUT/ckpt-1" --nproc 1 --device cpu --prompt "$PROMPT" --max-new-tokens 24 --no-stream \
  --save "$OUT/run-1.json" --dump-logits > /dev/null

step "8/8 parity: 2-rank tokens vs 1-rank tokens, then the exact check (same tokens in, quantisation simulations off)"
PARTED=0
python3 - "$OUT/run-2.json" "$OUT/run-1.json" <<'EOF' || PARTED=$?
import json, sys
two, one = (json.load(open(p)) for p in sys.argv[1:3])
a, b = two["results"][0]["tokens"], one["results"][0]["tokens"]
print(f"2 ranks (dp {two['dp']} x tp {two['tp']}, ep {two['ep']}, {two['redundant_experts']} redundant experts, "
      f"{two['expert_exchange']}): {a}")
print(f"1 rank:  {b}")
if a != b:
    first = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
    ref = sorted(one["results"][0]["logits"][first], reverse=True)
    print(f"the greedy streams part at position {first} (1-rank top-2 logit gap there: {ref[0] - ref[1]:.3g})")
    sys.exit(3)  # not a failure by itself: see below
worst = max(abs(x - y) for r2, r1 in zip(two["results"][0]["logits"], one["results"][0]["logits"])
            for x, y in zip(r2, r1))
print(f"{len(a)} greedy tokens identical; largest logit difference over all steps: {worst:.2g}")
EOF
# Equal streams are likely, not guaranteed: tp sums partial results in another order than one rank, so activations
# differ in their last float32 bits, and the published numerics round the indexer's queries and keys to FP4 and the
# cache to FP8. Once in a while a last-bit difference sits on a rounding boundary, one code rounds the other way, the
# indexer keeps another entry, and a random-weight model's next tokens change (docs/model-attention.md, "Parity
# across layouts"). What is guaranteed, and checked on every step: with the simulations off, both layouts fed the
# same tokens give the same logits up to float32 rounding.
cat > "$OUT/forced.py" <<'EOF'
import json, sys
import torch
from ascend import dist as mesh_lib
from ascend.launch import Request, check_checkpoint
from ascend.model_session import build_session
from model.tokenizer import load_tokenizer

ckpt, prompt, stream_json, sim, save = sys.argv[1:6]
env = mesh_lib.LaunchEnv.from_env()
checked = check_checkpoint(ckpt, env.rank, env.world_size)
mesh = mesh_lib.init(tp=checked.plan.tp, ep=checked.plan.ep, device="cpu")
session, _, _ = build_session(ckpt, checked, mesh)
session.model.set_quant_sim(sim == "on")
ids = load_tokenizer(ckpt).encode(Request("0", [{"role": "user", "content": prompt}]).prompt())
stream = json.load(open(stream_json))["results"][0]["tokens"]
logits = [session.prefill([ids], len(ids) + len(stream))[0]]
for tok in stream[:-1]:  # the 1-rank tokens, whatever this layout would have picked
    logits.append(session.decode(torch.tensor([tok]), torch.tensor([True]))[0])
if env.rank == 0:
    json.dump([row.tolist() for row in logits], open(save, "w"))
mesh.destroy()
EOF
[ "$PARTED" = 0 ] || [ "$PARTED" = 3 ] || exit "$PARTED"
forced() {  # forced SIM: logits of both layouts fed the 1-rank tokens -> $OUT/forced-{2,1}-SIM.json
  for n in 2 1; do
    python3 -m torch.distributed.run --standalone --nproc-per-node "$n" "$OUT/forced.py" "$OUT/ckpt-$n" "$PROMPT" \
      "$OUT/run-1.json" "$1" "$OUT/forced-$n-$1.json" > "$OUT/forced-$n.log" 2>&1 || { cat "$OUT/forced-$n.log"; exit 1; }
  done
}
forced off
[ "$PARTED" = 0 ] || forced on
python3 - "$OUT" "$PARTED" <<'EOF'
import json, os, sys
out, parted = sys.argv[1], sys.argv[2] == "3"
TOL = 1e-4  # reordered float32 sums: ~1e-6 here; one FP4 / FP8 code or top-k choice the other way: 1e-3 and more

def diffs(sim):
    two, one = (json.load(open(os.path.join(out, f"forced-{n}-{sim}.json"))) for n in (2, 1))
    assert len(two) == len(one)
    return [max(abs(x - y) for x, y in zip(r2, r1)) for r2, r1 in zip(two, one)]

off = diffs("off")
print(f"simulations off, both layouts fed the 1-rank tokens: largest logit difference over {len(off)} steps "
      f"{max(off):.2g}")
if not max(off) <= TOL:
    print(f"PARITY FAILED: 2 ranks and 1 rank compute different functions (logits differ by {max(off):.3g} > {TOL})")
    sys.exit(1)
if parted:
    on = diffs("on")
    first = next((i for i, d in enumerate(on) if d > TOL), None)
    if first is not None:
        print(f"simulations on, same tokens in: logits differ by {on[first]:.2g} first at step {first} "
              f"(largest {max(on):.2g}): a last-bit difference crossed an FP4 / FP8 rounding or a top-k boundary")
    else:  # no discontinuity: only a near-tie of the final logits themselves may part the streams
        two, one = (json.load(open(os.path.join(out, f"run-{n}.json")))["results"][0] for n in (2, 1))
        at = next(i for i, (x, y) in enumerate(zip(two["tokens"], one["tokens"])) if x != y)
        ref = sorted(one["logits"][at], reverse=True)
        if ref[0] - ref[1] > TOL:
            print(f"PARITY FAILED: the streams parted at {at} although the same tokens give the same logits there")
            sys.exit(1)
        print(f"the streams parted at a near-tie of the greedy choice (top-2 gap {ref[0] - ref[1]:.2g})")
    print("PARITY OK: the layouts agree to float32 rounding; the greedy streams parted where a last-bit difference "
          "may legitimately change a choice (why: scripts/demo.sh, step 8)")
else:
    print("PARITY OK: identical greedy tokens, and equal logits to float32 rounding with the simulations off")
EOF
echo "demo finished in $(( $(date +%s) - T0 )) s; outputs in $OUT"
