#!/usr/bin/env bash
# Served A/B: plain vLLM default vs the plugin in full mode, as `vllm serve` runs
# them (multiprocess, default flags: compiled; plain keeps prefix caching on),
# both servers alive side by side. `vllm bench serve` (random prompts, a new
# seed per round, 256 tokens in, 32 out, 4 x c prompts) runs against each in
# turn, the order flipping every round, at concurrency 1 and 32; 3 rounds.
# Prints full / plain output tokens/s per round and writes every bench JSON
# plus summary.json (date, machine, versions, ratios) under OUT.
#   bash benchmarks/serve_ab.sh          # ~8 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
DR=$($V/drllm prepare | tail -1)
BASE=$(dirname "$(dirname "$DR")")/base/$(basename "$DR" -drllm)
export OUT=${OUT:-benchmarks/results/serve_ab_$(date +%Y%m%d_%H%M)}; mkdir -p $OUT
export VLLM_CPU_KVCACHE_SPACE=2 VLLM_PLUGINS=drllm
$V/vllm serve $BASE --port 18401 --max-model-len 1024 > $OUT/plain.log 2>&1 &
P1=$!
$V/vllm serve $DR --port 18402 --max-model-len 1024 > $OUT/plugin.log 2>&1 &
P2=$!
trap "kill $P1 $P2" EXIT
for port in 18401 18402; do until curl -sf localhost:$port/v1/models > /dev/null; do sleep 2; done; done
run() { # name port model extra concurrency round
  $V/vllm bench serve --backend openai --port $2 --model $3 --dataset-name random \
    --random-input-len 256 --random-output-len 32 --num-prompts $(( $5 * 4 )) --max-concurrency $5 \
    --seed $((1000 * $6 + $5)) ${4:+--extra-body "$4"} --save-result --result-dir $OUT \
    --result-filename $1_c$5_r$6.json > /dev/null 2>&1
}
for c in 1 32; do
  for r in 0 1 2; do
    if (( r % 2 == 0 )); then run plain 18401 $BASE "" $c $r; run full 18402 $DR '{"vllm_xargs": {"drllm_mode": "full"}}' $c $r
    else run full 18402 $DR '{"vllm_xargs": {"drllm_mode": "full"}}' $c $r; run plain 18401 $BASE "" $c $r; fi
  done
done
$V/python - <<'PY'
import json, os, statistics, sys
from datetime import datetime, timezone
sys.path.insert(0, ".")
from benchmarks.throughput import machine, versions
out = os.environ["OUT"]
summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "versions": versions(), "command": "bash benchmarks/serve_ab.sh", "concurrency": {}}
print("  c round plain_tok/s full_tok/s full/plain")
for c in (1, 32):
    ratios = []
    for r in range(3):
        a = json.load(open(f"{out}/plain_c{c}_r{r}.json")); b = json.load(open(f"{out}/full_c{c}_r{r}.json"))
        ratios.append(b["output_throughput"] / a["output_throughput"])
        print(f"{c:3d} {r:5d} {a['output_throughput']:11.1f} {b['output_throughput']:10.1f} {ratios[-1]:10.3f}")
    summary["concurrency"][c] = {"ratios": ratios, "median": statistics.median(ratios)}
    print(f"concurrency {c}: full / plain default output tok/s, median {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
