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

# shellcheck source=tools/e2e/venv.sh
. tools/e2e/venv.sh
e2e_venv "$VENV" "openai==$OPENAI_VERSION" "tokenizers==$TOKENIZERS_VERSION"

if [ ! -x "$BIN" ] || [ "${QWEN2VL_E2E_REBUILD:-0}" = 1 ]; then
  echo "== cargo build -p qwen2vl-cli (debug: the test hook is compiled into debug builds only)"
  cargo build -p qwen2vl-cli
fi

echo "== openai $OPENAI_VERSION against $BIN serve"
QWEN2VL_BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" \
  exec "$VENV/bin/python" tools/e2e/openai_test.py "$@"
