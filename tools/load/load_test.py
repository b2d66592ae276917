#!/usr/bin/env python3
"""Load test for `qwen2vl serve` (or any OpenAI-compatible server): N concurrent streamed chat
completions, reporting time to first token, inter-token latency and total throughput.

Standard library only (http.client + threads), so it runs anywhere Python 3.8+ does.

For each concurrency level in --streams, `streams` workers each send --requests streamed
requests back to back (`stream: true`, `stream_options.include_usage`, EOS-independent
`max_tokens`; `ignore_eos` is not an OpenAI field, so a model may stop early: completion
tokens are counted from the server's usage chunk). Per request it records:
  ttft_ms   request sent -> first content delta
  itl_ms    gaps between consecutive content deltas (each delta is one released text piece)
  tokens    usage.completion_tokens
Per level it prints p50/p99 TTFT, p50/p99 inter-token latency, requests/s and total
completion tokens/s (all tokens of all requests / wall time of the level), and with --json one
JSON object per level.

Usage:
  python tools/load/load_test.py --url http://127.0.0.1:8080 --streams 1 4 8 16 \
      --requests 2 --max-tokens 32 [--image tests/fixtures/images/photo640.png] [--api-key KEY] \
      [--distinct-prompts]
"""
import argparse
import base64
import http.client
import json
import mimetypes
import statistics
import sys
import threading
import time
import urllib.parse


def percentile(values, p):
    """Nearest-rank percentile (p in [0, 100]); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def build_body(args, image_uri, question=None):
    """One request's body; `question` (an int) makes its prompt differ from the others'."""
    content = []
    if image_uri:
        content.append({"type": "image_url", "image_url": {"url": image_uri}})
    text = args.prompt if question is None else f"{args.prompt} (Question {question}.)"
    content.append({"type": "text", "text": text})
    return json.dumps({
        "model": args.model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }).encode()


def one_request(url, headers, body, timeout):
    """Sends one streamed request; returns dict(ttft_ms, itl_ms list, tokens, error)."""
    u = urllib.parse.urlparse(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=timeout)
    t0 = time.perf_counter()
    out = {"ttft_ms": None, "itl_ms": [], "tokens": 0, "error": None}
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return out
        last = None
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"].get("completion_tokens", 0)
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        out["ttft_ms"] = (now - t0) * 1000.0
                    else:
                        out["itl_ms"].append((now - last) * 1000.0)
                    last = now
    except Exception as e:  # noqa: BLE001 - a load test reports every failure and goes on
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return out


def run_level(args, streams, body, headers, image_uri):
    results = []
    lock = threading.Lock()

    def worker(w):
        for j in range(args.requests):
            b = build_body(args, image_uri, w * args.requests + j) if args.distinct_prompts else body
            r = one_request(args.url, headers, b, args.timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if not r["error"]]
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    itl = [x for r in ok for x in r["itl_ms"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "streams": streams,
        "requests": len(results),
        "errors": [r["error"] for r in results if r["error"]],
        "wall_s": round(wall, 3),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p99": percentile(ttft, 99),
        "itl_ms_p50": percentile(itl, 50),
        "itl_ms_p99": percentile(itl, 99),
        "itl_ms_mean": statistics.fmean(itl) if itl else None,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default="qwen2vl")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per stream, back to back")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="Describe this image.")
    ap.add_argument("--image", help="an image file, sent as a data URI (default: text only)")
    ap.add_argument("--distinct-prompts", action="store_true",
                    help="give every request its own question (the prompt plus a number), "
                         "as clients asking different things about one image do")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    ap.add_argument("--json", action="store_true", help="one JSON object per level on stdout")
    args = ap.parse_args()

    image_uri = None
    if args.image:
        mime = mimetypes.guess_type(args.image)[0] or "image/png"
        with open(args.image, "rb") as f:
            image_uri = f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")
    body = build_body(args, image_uri)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"

    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    if not args.json:
        print(f"{'streams':>7} {'reqs':>5} {'err':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8} {'tok/s':>8} {'wall s':>7}")
    failed = False
    for n in args.streams:
        r = run_level(args, n, body, headers, image_uri)
        failed |= bool(r["errors"])
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{n:>7} {r['requests']:>5} {len(r['errors']):>4} {fmt(r['ttft_ms_p50']):>9} "
                  f"{fmt(r['ttft_ms_p99']):>9} {fmt(r['itl_ms_p50']):>8} {fmt(r['itl_ms_p99']):>8} "
                  f"{fmt(r['tokens_per_s'], 2):>8} {fmt(r['wall_s'], 1):>7}")
            for e in r["errors"][:3]:
                print(f"        error: {e}", file=sys.stderr)
        sys.stdout.flush()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
