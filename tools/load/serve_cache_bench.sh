#!/bin/bash
# Run from the repository root after `cargo build --release -p qwen2vl-cli`; QWEN2VL, MODEL and IMAGE override the defaults.
# serve: 8 clients, different questions about photo640.png, 2B random f32, 2 threads.
B=${QWEN2VL:-target/release/qwen2vl}
M=${MODEL:-/tmp/qwen2vl-2b-random}
IMG=${IMAGE:-tests/fixtures/images/photo640.png}
uptime
for mode in off on; do
  if [ $mode = off ]; then X="--prefix-cache-mb 0 --encoder-cache-mb 0"; else X=""; fi
  echo "== caches $mode"
  $B serve --model $M --threads 2 --port 18181 $X > /tmp/serve-cache-bench-$mode.log 2>&1 &
  pid=$!
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:18181/health >/dev/null && break; sleep 1; done
  python3 "$(dirname "$0")/load_test.py" --url http://127.0.0.1:18181 --streams 8 --requests 1 --max-tokens 16 --image $IMG --distinct-prompts
  curl -s http://127.0.0.1:18181/metrics | grep -E "^qwen2vl_(prefix|encoder)_cache_(hits|misses|cached_tokens)" 
  kill -INT $pid; wait $pid
done
uptime
