#!/usr/bin/env bash
# End-to-end tests of `qwen2vl serve` with the official `openai` Python client
# (tools/e2e/openai_test.py). Makes a venv with pinned packages, builds the debug CLI when
# it is missing, runs the tests; exits non-zero when one fails.
#
#   tools/e2e/openai_test.sh                    # all tests
#   tools/e2e/openai_test.sh -v ToolCallTest    # arguments go to unittest
#
# QWEN2VL_E2E_VENV: where the venv lives (default target/e2e-venv).
# QWEN2VL_E2E_REBUILD=1: run `cargo build -p qwen2vl-cli` even when the binary exists.
set -euo pipefail
cd "$(dirname "$0")/../.."

OPENAI_VERSION=3.54.0
TOKENIZERS_VERSION=0.23.3
VENV="${QWEN2VL_E2E_VENV:-target/e2e-venv}"
BIN="${QWEN2VL_BIN:-target/debug/qwen2vl}"

# Debian/Ubuntu's python3 needs python3-venv (ensurepip) for `python3 -m venv`.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  else
    echo "openai_test.sh: python3 cannot make a venv (install the venv module)" >&2
    exit 1
  fi
fi

want="openai==$OPENAI_VERSION tokenizers==$TOKENIZERS_VERSION"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.e2e-packages" 2>/dev/null)" != "$want" ]; then
  echo "== venv $VENV ($want)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $want
  echo "$want" >"$VENV/.e2e-packages"
fi

if [ ! -x "$BIN" ] || [ "${QWEN2VL_E2E_REBUILD:-0}" = 1 ]; then
  echo "== cargo build -p qwen2vl-cli (debug: the test hook is compiled into debug builds only)"
  cargo build -p qwen2vl-cli
fi

echo "== openai $OPENAI_VERSION against $BIN serve"
QWEN2VL_BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" \
  exec "$VENV/bin/python" tools/e2e/openai_test.py "$@"
