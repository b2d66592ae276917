#!/usr/bin/env python3
"""Build the tiny random-weight Qwen2.5-VL checkpoint with transformers 4.49.0.

  tests/fixtures/tiny-qwen25vl/   Qwen2_5_VLForConditionalGeneration: text hidden 32, 2 layers,
      2 heads / 1 kv head, tied embeddings, mrope_section [2, 3, 3]; vision tower of depth 4,
      width 32, 2 heads, SwiGLU width 56, window_size 112 (4x4 merged tokens), blocks 1 and 3
      full-attention, 0 and 2 windowed (every second block: a pattern llama.cpp's converter can
      write as clip.vision.n_wa_pattern = 2, as the released [7, 15, 23, 31] is 8),
      tokens_per_second 2 (Qwen2.5-VL-7B's); bf16, one model.safetensors,
      4.49 key naming (model.layers.*, visual.*), config.json laid out like
      Qwen2.5-VL-3B-Instruct's on the hub (vision_config with in_chans, spatial_patch_size).

Weights: the scaled init of make_tiny_model.py (init_tensor; RMSNorm weights ~ U(0.6, 1.4),
down_proj gain 3), every tensor from its own generator seeded by (seed, name).

The reference cases that use it (qwen25_*) are in dump_reference.py.

Usage: python tools/reference/make_qwen25vl.py
       python tools/reference/make_qwen25vl.py --preset-3b|--preset-7b [OUT]   # real 3B / 7B
           shapes, random weights, for `qwen2vl bench` (default OUT: /tmp/qwen25vl-3b-random,
           7.5 GB; /tmp/qwen25vl-7b-random, 16.6 GB)
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_tiny_model import (  # noqa: E402
    FIXTURES, SPECIAL_IDS, clean_dir, init_tensor, write_aux_files, write_shards,
)
import make_tiny_model  # noqa: E402

OUT = os.path.join(FIXTURES, "tiny-qwen25vl")
SEED = 20250201
DTYPE = "bfloat16"
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, mrope_section=[2, 3, 3])
VISION = dict(depth=4, hidden_size=32, intermediate_size=56, num_heads=2, out_hidden_size=64,
              window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2)

# Qwen2.5-VL's preprocessor_config.json (the same image processor as Qwen2-VL's)
PREPROCESSOR_CONFIG = dict(make_tiny_model.PREPROCESSOR_CONFIG, processor_class="Qwen2_5_VLProcessor")


def hub_config(t=TEXT, v=VISION, tied=True):
    """config.json laid out like Qwen2.5-VL-3B-Instruct's on the hub."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": t["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": 128000,
        "max_window_layers": t["num_hidden_layers"],
        "model_type": "qwen2_5_vl",
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": DTYPE,
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v["depth"],
            "hidden_act": "silu",
            "hidden_size": v["hidden_size"],
            "intermediate_size": v["intermediate_size"],
            "num_heads": v["num_heads"],
            "in_chans": 3,
            "out_hidden_size": v["out_hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": v["window_size"],
            "fullatt_block_indexes": list(v["fullatt_block_indexes"]),
            "tokens_per_second": v["tokens_per_second"],
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(t["mrope_section"])},
        "vocab_size": 151936,
    }


def make_config(cj=None):
    from transformers import Qwen2_5_VLConfig

    cj = dict(cj or hub_config())
    cj.pop("transformers_version")
    cfg = Qwen2_5_VLConfig(**cj)
    head_dim = cj["hidden_size"] // cj["num_attention_heads"]
    assert sum(cj["rope_scaling"]["mrope_section"]) * 2 == head_dim
    for k, val in SPECIAL_IDS.items():
        assert getattr(cfg, k) == val, k
    return cfg


def load_reference_model(model_dir, dtype=torch.float32, attn_implementation="eager"):
    """The checkpoint as the reference computes with it: from_pretrained, cast to `dtype`,
    eager attention (decoder and vision tower)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, torch_dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    if attn_implementation == "eager":
        assert type(model.model.layers[0].self_attn).__name__ == "Qwen2_5_VLAttention"
        assert type(model.visual.blocks[0].attn).__name__ == "Qwen2_5_VLVisionAttention"
    return model


def main():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(2)
    cfg = make_config()
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    sd_dtype = getattr(torch, DTYPE)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            prm.copy_(init_tensor(name, prm.shape, SEED).to(sd_dtype).to(torch.float32))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    clean_dir(OUT)
    sd = {k: v.detach().to(sd_dtype).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    names = sorted(sd)
    assert "visual.blocks.0.mlp.gate_proj.bias" in names and "visual.merger.ln_q.weight" in names
    assert "visual.merger.ln_q.bias" not in names and "visual.blocks.0.norm1.bias" not in names
    write_shards(sd, OUT, 1)
    write_aux_files(OUT, hub_config())
    with open(os.path.join(OUT, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
        f.write("\n")
    # Reload as the reference does: the same weights and config.
    m = load_reference_model(OUT)
    a, b = model.state_dict(), m.state_dict()
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    vc = m.config.vision_config
    for k, val in VISION.items():
        assert getattr(vc, k) == val, (k, getattr(vc, k), val)
    assert vc.in_channels == 3
    print(f"wrote {OUT}")
    for fn in sorted(os.listdir(OUT)):
        print(f"  {fn:40s} {os.path.getsize(os.path.join(OUT, fn)):>10d}")


# Qwen2.5-VL-3B-Instruct's shapes (its config.json on the hub), for speed measurements.
TEXT_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, intermediate_size=11008, mrope_section=[16, 24, 24])
VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                 out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                 tokens_per_second=2)


# Qwen2.5-VL-7B-Instruct's shapes (untied head).
TEXT_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, mrope_section=[16, 24, 24])
VISION_7B = dict(VISION_3B, out_hidden_size=3584)
PRESETS = {"3b": (TEXT_3B, VISION_3B, True, 2), "7b": (TEXT_7B, VISION_7B, False, 4)}


def make_preset(preset, out):
    """Random weights with a released model's shapes (`PRESETS`), bf16, built tensor by
    tensor (peak memory about one shard), the same init as the tiny model: `qwen2vl bench`
    then costs what the real model costs."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    text, vision, tied, shards = PRESETS[preset]
    cj = hub_config(text, vision, tied)
    cfg = make_config(cj)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()
              if not tied or k != "lm_head.weight"]
    del model
    clean_dir(out)
    total = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    target = total / shards
    shard, size, no, weight_map = {}, 0, 1, {}

    def flush(shard, no):
        fname = f"model-{no:05d}-of-{shards:05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = fname
        print(f"  wrote {fname} ({len(shard)} tensors)", flush=True)

    for k, shp in shapes:
        t = init_tensor(k, shp, SEED).to(torch.bfloat16)
        if shard and size + t.numel() * 2 > target and no < shards:
            flush(shard, no)
            shard, size, no = {}, 0, no + 1
        shard[k] = t
        size += t.numel() * 2
    flush(shard, no)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    write_aux_files(out, cj)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
        f.write("\n")
    print(f"{preset}: wrote {out}, {total / 1e9:.2f} GB of weights")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] in ("--preset-3b", "--preset-7b"):
        preset = sys.argv[1][-2:]
        make_preset(preset, sys.argv[2] if len(sys.argv) > 2 else f"/tmp/qwen25vl-{preset}-random")
    else:
        main()
