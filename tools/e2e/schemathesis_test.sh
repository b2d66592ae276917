#!/usr/bin/env bash
# Schema-driven fuzzing of the HTTP API: schemathesis (pinned, from PyPI) reads the OpenAPI
# document the server serves at /openapi.json and sends generated requests (valid ones and
# ones that break the schema) to every operation of the debug `qwen2vl serve` on the tiny
# fixture model. Checks: no 5xx (not_a_server_error), every status is one the document lists
# (status_code_conformance), every JSON body and SSE event matches its schema
# (response_schema_conformance), and content types and documented headers (Allow,
# Retry-After, WWW-Authenticate) are as documented.
# Bounded: --max-examples per operation and a wall-clock limit; exits non-zero on a failure.
#
#   tools/e2e/schemathesis_test.sh
#   QWEN2VL_SCHEMATHESIS_EXAMPLES=200 QWEN2VL_SCHEMATHESIS_TIMEOUT=1800 \
#     QWEN2VL_SCHEMATHESIS_SEED=$RANDOM tools/e2e/schemathesis_test.sh   # a longer run
#
# QWEN2VL_SCHEMATHESIS_VENV: where the venv lives (default target/schemathesis-venv).
# QWEN2VL_BIN: the binary (default target/debug/qwen2vl; built when missing).
# The report (JUnit XML, and the failures as a pytest file) goes to target/schemathesis.
set -euo pipefail
cd "$(dirname "$0")/../.."

SCHEMATHESIS_VERSION=4.32.5
VENV="${QWEN2VL_SCHEMATHESIS_VENV:-target/schemathesis-venv}"
BIN="${QWEN2VL_BIN:-target/debug/qwen2vl}"
EXAMPLES="${QWEN2VL_SCHEMATHESIS_EXAMPLES:-20}"
TIMEOUT="${QWEN2VL_SCHEMATHESIS_TIMEOUT:-180}"
SEED="${QWEN2VL_SCHEMATHESIS_SEED:-1}"
REPORT="${QWEN2VL_SCHEMATHESIS_REPORT:-target/schemathesis}"

# shellcheck source=tools/e2e/venv.sh
. tools/e2e/venv.sh
e2e_venv "$VENV" "schemathesis==$SCHEMATHESIS_VERSION"

if [ ! -x "$BIN" ]; then
  echo "== cargo build -p qwen2vl-cli"
  cargo build -p qwen2vl-cli
fi

# The server on a free loopback port; its address is read from its log.
LOG="$(mktemp "${TMPDIR:-/tmp}/qwen2vl-schemathesis-XXXXXX.log")"
"$BIN" serve --model tests/fixtures/tiny-qwen2vl --served-model-name tiny-schemathesis \
  --host 127.0.0.1 --port 0 --max-running 4 --default-max-tokens 8 \
  </dev/null >"$LOG" 2>&1 &
SERVER=$!
stop_server() {
  if kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER" 2>/dev/null || true
  fi
  wait "$SERVER" 2>/dev/null || true
  rm -f "$LOG"
}
trap stop_server EXIT

URL=""
for _ in $(seq 600); do
  URL="$(sed -n 's/.*serving [^ ]* on \(http:\/\/[^ ]*\).*/\1/p' "$LOG" | head -n1)"
  [ -n "$URL" ] && break
  if ! kill -0 "$SERVER" 2>/dev/null; then break; fi
  sleep 0.2
done
if [ -z "$URL" ]; then
  echo "schemathesis_test.sh: the server did not start:" >&2
  cat "$LOG" >&2
  exit 1
fi

echo "== schemathesis $SCHEMATHESIS_VERSION against $URL/openapi.json" \
  "(max $EXAMPLES examples per operation, seed $SEED, at most ${TIMEOUT}s)"
mkdir -p "$REPORT"
start=$(date +%s)
status=0
SCHEMATHESIS_HOOKS=tools/e2e/schemathesis_hooks.py \
  timeout --kill-after=10 "$TIMEOUT" "$VENV/bin/schemathesis" run "$URL/openapi.json" \
  --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance,response_headers_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "$EXAMPLES" --seed "$SEED" --workers 2 \
  --request-timeout 120 --suppress-health-check all \
  --report junit,pytest --report-dir "$REPORT" \
  --no-color </dev/null || status=$?
echo "== schemathesis took $(( $(date +%s) - start ))s, exit status $status"
# What the chat route answered (the server counts requests by status): both accepted and
# refused requests should be there, or the run did not reach past the first checks.
"$VENV/bin/python" - "$URL/metrics" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
counts = [l.split("{", 1)[1] for l in text.splitlines() if l.startswith("qwen2vl_requests_total{")]
print("== chat completions by status:", ", ".join(c.replace('status="', "").replace('"}', ":") for c in counts))
PY
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "schemathesis_test.sh: schemathesis ran past ${TIMEOUT}s" >&2
fi
if [ "$status" != 0 ]; then
  echo "== server log (last 40 lines)" >&2
  tail -n 40 "$LOG" >&2
fi
exit "$status"
