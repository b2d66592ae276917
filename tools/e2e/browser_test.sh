#!/usr/bin/env bash
# The chat page at / in headless Chromium against `qwen2vl serve` with the tiny fixture
# model (tools/e2e/browser/browser_test.mjs says what is checked). Installs Debian's
# chromium when /usr/bin/chromium is missing, the pinned playwright-core from
# tools/e2e/browser/package-lock.json, and builds the debug binary when it is missing
# (the scripted-answer hook the test needs exists in debug builds only).
#
#   tools/e2e/browser_test.sh        # screenshot: target/e2e/page.png (E2E_OUT to change)
set -euo pipefail
cd "$(dirname "$0")/../.."

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  echo "browser_test: installing chromium" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium
fi
export CHROMIUM

(cd tools/e2e/browser && npm ci --no-audit --no-fund --loglevel=error)

export QWEN2VL_BIN="${QWEN2VL_BIN:-$PWD/target/debug/qwen2vl}"
if [ ! -x "$QWEN2VL_BIN" ]; then
  cargo build -p qwen2vl-cli
fi

exec node tools/e2e/browser/browser_test.mjs
