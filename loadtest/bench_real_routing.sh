#!/usr/bin/env bash
# The routing benchmark on the real cluster: 2 vLLM CPU replicas of the embedded model whose KV
# cache is capped (24 blocks of 128 tokens) so the shared prefixes do not fit on one replica.
# For each policy: start `inference-cluster serve`, read the engines' prefix-cache counters,
# run the same shared-prefix load, read the counters again, stop. Prints the engine hit rate and
# TTFT per policy. Usage: loadtest/bench_real_routing.sh [POLICY ...] (default: pow2 cache_load)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
policies=("${@:-pow2 cache_load}")
for policy in ${policies[@]}; do
  config="$out/$policy.yaml"
  sed 's/      num_gpu_blocks_override: 64 .*/      num_gpu_blocks_override: 24/' \
    cluster/configs/local.yaml > "$config"
  printf '    routing:\n      policy: %s\n      seed: 1\n' "$policy" >> "$config"
  setsid .venv/bin/inference-cluster serve --config "$config" > "$out/$policy.serve.log" 2>&1 &
  serve_pid=$!
  for _ in $(seq 1 300); do grep -q "ready in" "$out/$policy.serve.log" && break; sleep 1; done
  .venv/bin/inference-cluster status --json > "$out/$policy.before.json"
  .venv/bin/loadtest run --base-url http://127.0.0.1:8000 --workload shared-prefix \
    --num-groups 8 --prompts-per-group 8 --system-prompt-len 768 --question-len 64 \
    --output-len 16 --rate 2 --seed 3 --out "$out/$policy" --no-progress ${EXTRA:-} > /dev/null
  .venv/bin/inference-cluster status --json > "$out/$policy.after.json"
  kill -INT -- "-$serve_pid"
  wait "$serve_pid" || true
  .venv/bin/python - "$out" "$policy" <<'PY'
import json, sys
out, policy = sys.argv[1:]
def hits(name):
    stats = [r["stats"] for d in json.load(open(f"{out}/{policy}.{name}.json")) for r in d["replicas"] if r["stats"]]
    return sum(s["prefix_cache_hits"] for s in stats), sum(s["prefix_cache_queries"] for s in stats)
(h0, q0), (h1, q1) = hits("before"), hits("after")
s = json.load(open(f"{out}/{policy}/summary.json"))
# The routers' predictions of each replica's cache vs what the engines found (policies with a
# prefix index only): the prediction's accuracy.
predictions = [r["predictions"] for d in json.load(open(f"{out}/{policy}.after.json")) for r in d["replicas"] if r.get("predictions")]
predicted = sum(p["predicted_cached_tokens"] for p in predictions)
found = sum(p["actual_cached_tokens"] for p in predictions)
accuracy = f", cached tokens found/predicted {found}/{predicted}" if predicted else ""
print(f"{policy}: engine hit rate {(h1 - h0) / max(q1 - q0, 1):.3f}, TTFT p50 {s['ttft_ms']['p50']:.1f} ms, "
      f"p90 {s['ttft_ms']['p90']:.1f} ms, completed {s['completed']}, failed {s['failed']}{accuracy}")
PY
done
echo "outputs in $out"
