#!/usr/bin/env python3
"""Speed and memory of the reference (transformers 4.49.0, float32, CPU) on one image prompt.

The same workload as `qwen2vl bench`: one image, one prompt, N new tokens with EOS ignored,
warm-up runs then timed runs; figures as median/min/max over the timed runs.

Measures (one JSON line on stdout; progress on stderr):
  load_s            checkpoint -> float32 model in memory (from_pretrained + cast)
  preprocess_ms     chat template + qwen-vl-utils + processor (once)
  vision_ms         model.visual(pixel_values, grid_thw) alone
  prefill_ms        the decoder's forward over the whole prompt (embeddings with the vision
                    rows scattered in, 4.49 M-RoPE ids), with KV cache; the vision tower is
                    not included. prefill_tok_s = prompt tokens / prefill time
  ttft_ms           preprocess + vision + prefill
  decode_tok_s      greedy decode speed after the first token: a plain loop of one-token
                    forwards with the KV cache (EOS ignored, so always max_new_tokens tokens)
  peak_rss_mb       each run's VmHWM (reset before the run); process_peak_rss_mb: ru_maxrss

Usage:
  python tools/reference/bench_transformers.py --model /tmp/qwen2vl-2b-random \
      --image tests/fixtures/images/photo640.png --prompt "Describe this image." \
      --max-new-tokens 32 --threads 2 --warmup 1 --runs 3
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_tiny_model import load_reference_model  # noqa: E402


def ms(t0):
    return (time.perf_counter() - t0) * 1000.0


def reset_peak_rss():
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (what qwen2vl bench does)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def stat(values):
    """median / min / max, as qwen2vl bench reports them."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"median": round(med, 3), "min": round(v[0], 3), "max": round(v[-1], 3)}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Describe this image.")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--runs", type=int, default=3, help="timed runs")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="attention implementation (4.49's default on CPU is sdpa)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())

    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    t0 = time.perf_counter()
    model = load_reference_model(args.model, torch.float32, args.attn)
    load_s = ms(t0) / 1000.0
    processor = AutoProcessor.from_pretrained(args.model)

    t0 = time.perf_counter()
    messages = [{"role": "user", "content": [
        {"type": "image", "image": os.path.abspath(args.image)},
        {"type": "text", "text": args.prompt},
    ]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, return_tensors="pt")
    preprocess_ms = ms(t0)
    seq = inputs["input_ids"].shape[1]

    # Warm-up runs, then timed runs of the same workload qwen2vl bench times: the vision tower,
    # the text prefill alone (the prompt embeddings with the vision rows scattered in, the 4.49
    # M-RoPE ids, one forward with the KV cache), then a plain greedy loop of one-token
    # forwards with EOS ignored. Each run's peak RSS is its own (VmHWM reset through
    # /proc/self/clear_refs, as qwen2vl bench does).
    position_ids, rope_deltas = model.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"])
    runs = []
    for r in range(args.warmup + args.runs):
        can_reset = reset_peak_rss()
        t0 = time.perf_counter()
        image_embeds = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        vision_ms = ms(t0)
        embeds = model.model.embed_tokens(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
        model.rope_deltas = rope_deltas
        t0 = time.perf_counter()
        out = model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=inputs["attention_mask"],
                    use_cache=True, cache_position=torch.arange(seq))
        prefill_ms = ms(t0)
        pkv = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = [int(tok)]
        am = inputs["attention_mask"]
        n_decode = args.max_new_tokens - 1
        t0 = time.perf_counter()
        for i in range(n_decode):
            am = torch.cat([am, am.new_ones((1, 1))], dim=1)
            out = model(input_ids=tok, past_key_values=pkv, attention_mask=am,
                        cache_position=torch.tensor([seq + i]), use_cache=True)
            pkv = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ids.append(int(tok))
        decode_s = ms(t0) / 1000.0
        del pkv, out, embeds, image_embeds
        run = {
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "prefill_tok_s": seq / (prefill_ms / 1000.0),
            "ttft_ms": preprocess_ms + vision_ms + prefill_ms,
            "decode_tok_s": n_decode / decode_s if n_decode > 0 else None,
            "peak_rss_mb": peak_rss_mb() if can_reset else None,
            "ids": ids,
        }
        if r >= args.warmup:
            runs.append(run)
        print(f"{'warm-up' if r < args.warmup else 'run'} {r + 1}: vision {vision_ms:.0f} ms, "
              f"prefill {prefill_ms:.0f} ms, decode {run['decode_tok_s'] or 0:.2f} tok/s",
              file=sys.stderr)
    ids = runs[0]["ids"]

    cfg = model.config
    res = {
        "engine": "transformers",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "attn_implementation": args.attn,
        "threads": args.threads,
        "model": os.path.abspath(args.model),
        "text_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vision_depth": cfg.vision_config.depth,
        "image": os.path.basename(args.image),
        "image_grid_thw": inputs["image_grid_thw"].tolist(),
        "prompt_tokens": seq,
        "new_tokens": len(ids),
        "greedy_ids": ids,
        "greedy_ids_same_every_run": all(r["ids"] == ids for r in runs),
        "warmup": args.warmup,
        "runs": args.runs,
        "load_s": round(load_s, 3),
        "preprocess_ms": round(preprocess_ms, 1),
        **{k: stat([r[k] for r in runs]) for k in
           ["vision_ms", "prefill_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb"]},
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
