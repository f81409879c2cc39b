#!/usr/bin/env bash
# The whole path on one CPU machine, in a few minutes: install, synthesise a tiny DeepSeek-V4 checkpoint,
# plan for 2 ranks (tensor + expert parallel, redundant experts), convert, verify, launch 2 ranks on Gloo,
# chat, and check that the 2-rank tokens equal a 1-rank run of the same checkpoint.
#
#   bash scripts/demo.sh            # work in ./out/demo (removed and recreated)
#   SKIP_SETUP=1 bash scripts/demo.sh   # when the package is already installed
#
# The weights are RANDOM: the replies are meaningless text. What the demo proves is the machinery:
# sharding by plan, per-rank loading, TP/EP collectives, and parity with a single process.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-out/demo}
PROMPT=${PROMPT:-"Explain in one sentence why the sky is blue."}
export OMP_NUM_THREADS=1 ASCEND_DEVICE=cpu  # one thread per rank: 2 ranks on 2 cores
step() { printf '\n\033[1m== [%ss] %s\033[0m\n' "$(( $(date +%s) - T0 ))" "$*"; }

if [ -z "${SKIP_SETUP:-}" ]; then
  step "1/8 install: CPU torch 2.13.0 and this package (scripts/setup.sh)"
  bash scripts/setup.sh
fi

step "2/8 clean $OUT and synthesise a tiny V4 checkpoint (published layout: FP8 attention, FP4 experts, random weights)"
rm -rf "$OUT" && mkdir -p "$OUT"
ascend synth --preset tiny --out "$OUT/hf"

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

step "8/8 parity: 2-rank tokens vs 1-rank tokens"
python3 - "$OUT/run-2.json" "$OUT/run-1.json" <<'EOF'
import json, sys
two, one = (json.load(open(p)) for p in sys.argv[1:3])
a, b = two["results"][0]["tokens"], one["results"][0]["tokens"]
print(f"2 ranks (dp {two['dp']} x tp {two['tp']}, ep {two['ep']}, {two['redundant_experts']} redundant experts, "
      f"{two['expert_exchange']}): {a}")
print(f"1 rank:  {b}")
if a != b:
    first = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
    ref = sorted(one["results"][0]["logits"][first], reverse=True)
    print(f"PARITY FAILED: the token streams differ from position {first} "
          f"(1-rank top-2 logit gap there: {ref[0] - ref[1]:.3g})")
    sys.exit(1)
worst = max(abs(x - y) for r2, r1 in zip(two["results"][0]["logits"], one["results"][0]["logits"])
            for x, y in zip(r2, r1))
print(f"largest logit difference over all steps: {worst:.2g} (float32 sums in a different order)")
print(f"PARITY OK: {len(a)} greedy tokens identical")
EOF
echo "demo finished in $(( $(date +%s) - T0 )) s; outputs in $OUT"
