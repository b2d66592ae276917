#!/usr/bin/env bash
# llama.cpp's side of "how far quantization moves the numbers" (issue 12, Accuracy): its f16
# GGUF's log-probabilities over a text become the base (--kl-divergence-base), then each
# quantized GGUF is scored against them (--kl-divergence). Our side, on the same text and
# chunks, is `cargo run --release -p qwen2vl --example quant_kl` (it reads the base file
# this writes and checks that its token ids equal ours). Results: docs/benchmarks.md.
#
#   tools/reference/llamacpp_kl.sh            # paths below; override any with env vars
#
# Needs llama.cpp built by ../shared/peers/llamacpp-setup.sh (it builds llama-perplexity
# here if missing) and the GGUFs its `convert` step writes. Nothing is written into the
# project: the base file and logs go to $OUT.
set -euo pipefail
PEERS="${PEERS:-$HOME/.cache/qwen2vl-peers}"
LLAMA="${LLAMA:-$PEERS/llama.cpp}"
GGUF_DIR="${GGUF_DIR:-$PEERS/gguf}"
NAME="${NAME:-qwen2vl-2b-random}"
TEXT="${TEXT:-/work/shared/seeds/001_c2806d97194aa730.txt}"
CTX="${CTX:-512}"
CHUNKS="${CHUNKS:-4}"
THREADS="${THREADS:-2}"
FORMATS="${FORMATS:-q8_0 q4_k_m}"
OUT="${OUT:-/tmp/qkl}"
SAVE="${SAVE:-1}"   # also save each format's log-probabilities ($OUT/FORMAT.kld)
BIN="$LLAMA/build/bin/llama-perplexity"

if [[ ! -x "$BIN" ]]; then
  (cd "$LLAMA" && cmake --build build --target llama-perplexity -j"$(nproc)" >/dev/null)
fi
mkdir -p "$OUT"
# --no-repack: in a native build on a CPU with AMX, llama.cpp's repacked q8_0/q4_K prompt
# kernels die with SIGILL on the development VM (the tile registers are not usable there);
# without repacking the same formats run on its plain AVX-512 kernels.
common=(-f "$TEXT" -c "$CTX" --chunks "$CHUNKS" -t "$THREADS" --no-repack)

echo "base: $NAME-f16.gguf -> $OUT/base.kld"
"$BIN" -m "$GGUF_DIR/$NAME-f16.gguf" "${common[@]}" \
  --kl-divergence-base "$OUT/base.kld" >"$OUT/f16.log" 2>&1
grep -E "Final estimate" "$OUT/f16.log" || true

for f in $FORMATS; do
  echo "== $f"
  "$BIN" -m "$GGUF_DIR/$NAME-$f.gguf" "${common[@]}" \
    --kl-divergence --kl-divergence-base "$OUT/base.kld" >"$OUT/$f.log" 2>&1
  grep -E "^(Mean ln\(PPL|Mean    KLD|Maximum KLD|99.0%   KLD|Median  KLD|RMS Δp|Maximum Δp|Minimum Δp|Same top p)" "$OUT/$f.log"
  if [[ "$SAVE" == 1 ]]; then
    # The format's own log-probabilities in the same file layout, so quant_kl can set its
    # argmax against our bases too (llama:$OUT/$f.kld).
    "$BIN" -m "$GGUF_DIR/$NAME-$f.gguf" "${common[@]}" \
      --kl-divergence-base "$OUT/$f.kld" >"$OUT/$f.save.log" 2>&1
  fi
done
