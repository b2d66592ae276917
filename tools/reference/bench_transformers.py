#!/usr/bin/env python3
"""Speed and memory of the reference (transformers 4.49.0, float32, CPU) on one image prompt.

Measures (one JSON line on stdout):
  load_s            checkpoint -> float32 model in memory (from_pretrained + cast)
  preprocess_ms     chat template + qwen-vl-utils + processor
  vision_ms         model.visual(pixel_values, grid_thw) alone, second call (the first is
                    reported as vision_ms_first_call)
  prefill_ms        the decoder's forward over the whole prompt (embeddings with the vision
                    rows scattered in, 4.49 M-RoPE ids), with KV cache; the vision tower is
                    not included
  decode_tok_s      greedy decode speed after the first token: a plain loop of one-token
                    forwards with the KV cache (EOS ignored, so always max_new_tokens tokens)
  peak_rss_mb       resource.getrusage(RUSAGE_SELF).ru_maxrss

Usage:
  python tools/reference/bench_transformers.py --model /tmp/qwen2vl-2b-random \
      --image tests/fixtures/images/photo640.png --prompt "Describe this image." \
      --max-new-tokens 32 --threads 2
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


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Describe this image.")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="attention implementation (4.49's default on CPU is sdpa)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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

    # The vision tower twice: the first call pays one-time costs (allocator growth, kernel
    # selection); the second is what a running server sees. Both are reported.
    vision_runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        image_embeds = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        vision_runs.append(ms(t0))
    vision_ms = vision_runs[-1]

    # Text prefill alone (as the Rust engine times it): the prompt embeddings with the vision
    # rows scattered in, the 4.49 M-RoPE ids, then one forward with the KV cache.
    position_ids, rope_deltas = model.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"])
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
        "load_s": round(load_s, 3),
        "preprocess_ms": round(preprocess_ms, 1),
        "vision_ms": round(vision_ms, 1),
        "vision_ms_first_call": round(vision_runs[0], 1),
        "prefill_ms": round(prefill_ms, 1),
        "decode_tok_s": round(n_decode / decode_s, 3) if n_decode > 0 else None,
        "decode_ms_per_token": round(decode_s * 1000 / n_decode, 1) if n_decode > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
