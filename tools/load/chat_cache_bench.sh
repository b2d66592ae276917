#!/bin/bash
# Run from the repository root after `cargo build --release -p qwen2vl-cli`; QWEN2VL, MODEL and IMAGE override the defaults.
# 5-turn chat with one image, 2B random f32, 2 threads: caches off, then on.
B=${QWEN2VL:-target/release/qwen2vl}
M=${MODEL:-/tmp/qwen2vl-2b-random}
IMG=${IMAGE:-tests/fixtures/images/photo640.png}
uptime
for mode in off on; do
  if [ $mode = off ]; then X="--prefix-cache-mb 0 --encoder-cache-mb 0"; else X=""; fi
  echo "== caches $mode"
  s=$(date +%s.%N)
  $B chat --model $M --image $IMG --threads 2 --max-new-tokens 16 --temperature 0 --ignore-eos --stats -q $X < "$(dirname "$0")/chat_questions.txt" > /tmp/chat-cache-bench-$mode.out 2> /tmp/chat-cache-bench-$mode.err
  e=$(date +%s.%N)
  cat /tmp/chat-cache-bench-$mode.err
  echo "total wall (incl. load) $(echo "$e - $s" | bc) s"
done
cmp /tmp/chat-cache-bench-off.out /tmp/chat-cache-bench-on.out && echo "answers identical"
uptime
