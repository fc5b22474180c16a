#!/usr/bin/env bash
# Prefix caching and chunked prefill with a Dr.LLM checkpoint, as `vllm serve`
# runs it. Three plugin servers alive side by side (multiprocess, compiled):
#   on       defaults: exact prefix caching and chunked prefill on, step budget 512 tokens
#   nocache  --no-enable-prefix-caching (chunked prefill on, budget 512)
#   nochunk  --no-enable-chunked-prefill (prefix caching on, budget 4096: whole prompts)
# 1. Shared prefix: `vllm bench serve --dataset-name prefix_repetition`, one
#    1,000-token prefix, 24-token questions, 16 tokens out, concurrency 1, every
#    request pinned to one schedule (drllm_mode "schedule", 3 layers skipped),
#    against `on` and `nocache` in turn, 3 rounds, a new seed per round
#    (new random prefix). Reports median TTFT and output tok/s of each.
# 2. Chunked prefill: 8 streams decode 128 tokens each (32-token prompts) while
#    3,000-token prompts arrive one per second; against `on` and `nochunk`.
#    Reports the decode streams' inter-token latency (median, p99, max).
# Writes every bench JSON plus summary.json (date, machine, versions) under OUT.
#   bash benchmarks/prefix_chunk.sh          # ~10 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
DR=$($V/drllm prepare | tail -1)
export OUT=${OUT:-benchmarks/results/prefix_chunk_$(date +%Y%m%d_%H%M)}; mkdir -p $OUT
export VLLM_CPU_KVCACHE_SPACE=2 VLLM_PLUGINS=drllm
COMMON="--max-model-len 4096 --max-num-seqs 32"
$V/vllm serve $DR --port 18411 $COMMON --max-num-batched-tokens 512 > $OUT/on.log 2>&1 &
P1=$!
$V/vllm serve $DR --port 18412 $COMMON --max-num-batched-tokens 512 --no-enable-prefix-caching > $OUT/nocache.log 2>&1 &
P2=$!
$V/vllm serve $DR --port 18413 $COMMON --max-num-batched-tokens 4096 --no-enable-chunked-prefill > $OUT/nochunk.log 2>&1 &
P3=$!
trap "kill $P1 $P2 $P3" EXIT
for port in 18411 18412 18413; do until curl -sf localhost:$port/v1/models > /dev/null; do sleep 2; done; done
PINNED=$($V/python -c 'import json; print(json.dumps({"vllm_xargs": {"drllm_mode": "schedule",
  "drllm_schedule": [0 if i in (9, 19, 28) else 1 for i in range(30)]}}))')
bench() { # name port seed args...
  local name=$1 port=$2 seed=$3; shift 3
  $V/vllm bench serve --backend openai --port $port --model $DR --seed $seed \
    --save-result --result-dir $OUT --result-filename $name.json --percentile-metrics ttft,itl \
    --metric-percentiles 50,99 "$@" > $OUT/$name.out 2>&1
}
prefix() { # name port round
  bench $1 $2 $((100 + $3)) --dataset-name prefix_repetition --prefix-repetition-prefix-len 1000 \
    --prefix-repetition-suffix-len 24 --prefix-repetition-num-prefixes 1 \
    --prefix-repetition-output-len 16 --num-prompts 16 --max-concurrency 1 --extra-body "$PINNED"
}
for r in 0 1 2; do
  if (( r % 2 == 0 )); then prefix on_prefix_r$r 18411 $r; prefix nocache_prefix_r$r 18412 $r
  else prefix nocache_prefix_r$r 18412 $r; prefix on_prefix_r$r 18411 $r; fi
done
chunk() { # name port: decode streams while long prompts arrive
  bench $1_long $2 7 --dataset-name random --random-input-len 3000 --random-output-len 1 \
    --num-prompts 8 --request-rate 1 --extra-body '{"vllm_xargs": {"drllm_mode": "full"}}' &
  local long=$!
  bench $1_decode $2 8 --dataset-name random --random-input-len 32 --random-output-len 128 \
    --num-prompts 8 --max-concurrency 8 --ignore-eos --extra-body '{"vllm_xargs": {"drllm_mode": "full"}}'
  wait $long
}
chunk on_chunk 18411
chunk nochunk_chunk 18413
$V/python - <<'PY'
import json, os, statistics, sys
from datetime import datetime, timezone
sys.path.insert(0, ".")
from benchmarks.throughput import machine, versions
out = os.environ["OUT"]
load = lambda n: json.load(open(f"{out}/{n}.json"))
summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "versions": versions(), "command": "bash benchmarks/prefix_chunk.sh"}
rows = {k: [load(f"{k}_prefix_r{r}") for r in range(3)] for k in ("on", "nocache")}
ttft = {k: [x["median_ttft_ms"] for x in v] for k, v in rows.items()}
tput = {k: [x["output_throughput"] for x in v] for k, v in rows.items()}
ratio = [b / a for a, b in zip(ttft["on"], ttft["nocache"])]
summary["prefix"] = {"median_ttft_ms": ttft, "output_tok_s": tput, "ttft_nocache_over_on": ratio,
                     "median_ratio": statistics.median(ratio)}
print("shared 1,000-token prefix, pinned schedule, concurrency 1 (3 rounds)")
print("  round  TTFT caching on (ms)  TTFT caching off (ms)  off/on  tok/s on  tok/s off")
for r in range(3):
    print(f"  {r:5d} {ttft['on'][r]:20.1f} {ttft['nocache'][r]:22.1f} {ratio[r]:7.2f} "
          f"{tput['on'][r]:9.1f} {tput['nocache'][r]:10.1f}")
print(f"  median TTFT off/on: {statistics.median(ratio):.2f}x (target >= 3)")
summary["chunk"] = {}
print("decode streams (8 x 128 tokens) while 3,000-token prompts arrive, 1/s")
print("  server            ITL median (ms)  ITL p99 (ms)  long-prompt TTFT median (ms)")
for k, label in (("on", "chunked (512)"), ("nochunk", "whole prompts")):
    d, l = load(f"{k}_chunk_decode"), load(f"{k}_chunk_long")
    summary["chunk"][k] = {"itl_median_ms": d["median_itl_ms"], "itl_p99_ms": d["p99_itl_ms"],
                           "decode_output_tok_s": d["output_throughput"],
                           "long_ttft_median_ms": l["median_ttft_ms"]}
    print(f"  {label:16s} {d['median_itl_ms']:16.1f} {d['p99_itl_ms']:13.1f} {l['median_ttft_ms']:29.1f}")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
