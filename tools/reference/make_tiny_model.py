#!/usr/bin/env python3
"""Build random-weight Qwen2-VL checkpoints with transformers 4.49.0.

Presets:
  tiny    -> tests/fixtures/tiny-qwen2vl/         text hidden 64, 2 layers, 4 heads / 2 kv heads,
             tied embeddings, bf16, one model.safetensors, 4.49 key naming (model.layers.*,
             visual.*), config.json laid out like Qwen2-VL-2B-Instruct's (hand-written,
             vision_config with in_chans / spatial_patch_size, rope_scaling type "mrope").
  untied  -> tests/fixtures/tiny-qwen2vl-untied/  text hidden 32, 2 layers, 2 heads / 1 kv head,
             untied lm_head, fp16, TWO shards + model.safetensors.index.json, newer key naming
             (model.language_model.*, model.visual.*, lm_head.*), config.json as 4.49's
             save_pretrained writes it (full vision_config, rope_scaling type "default").
  2b      -> /tmp/qwen2vl-2b-random (not committed): the real Qwen2-VL-2B shapes, bf16, two
             shards, 4.49 key naming. Built tensor by tensor (meta-device model), low memory.

Weights are NOT transformers' default init (std 0.02 everywhere, zero biases, unit norms):
that gives near-uniform logits over 151,936 tokens, tiny greedy margins and layers whose
contribution vanishes next to the embeddings. Instead (see scaled_init):
  embeddings / lm_head ~ N(0, 1); linear and conv weights ~ N(0, gain^2 / fan_in) with gain 2.5
  for the text q/k projections and 1.5 for the vision qkv (peaked, position-dependent attention),
  3 for o_proj and down_proj (so the layers, not the tied input embedding, dominate the
  residual stream: otherwise greedy decoding just repeats the last token), 1 elsewhere; all
  biases ~ N(0, 0.2^2); RMSNorm / LayerNorm weights ~ U(0.6, 1.4), LayerNorm biases
  ~ N(0, 0.1^2).
Every tensor is drawn from its own torch.Generator seeded from (seed, tensor name), so the
result does not depend on module construction order.

Usage:
  python tools/reference/make_tiny_model.py                    # both tiny fixtures
  python tools/reference/make_tiny_model.py --preset tiny
  python tools/reference/make_tiny_model.py --preset 2b --out /tmp/qwen2vl-2b-random
"""
import argparse
import hashlib
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOKENIZER_DIR = os.path.join(FIXTURES, "tokenizer")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.json"]

SPECIAL_IDS = dict(
    bos_token_id=151643,
    eos_token_id=151645,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
    image_token_id=151655,
    video_token_id=151656,
)

# Qwen2-VL-2B-Instruct's generation_config.json
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "repetition_penalty": 1.0,
    "temperature": 0.01,
    "top_k": 1,
    "top_p": 0.001,
    "transformers_version": "4.49.0",
}

# Qwen2-VL-2B-Instruct's preprocessor_config.json
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

PRESETS = {
    "tiny": dict(
        out=os.path.join(FIXTURES, "tiny-qwen2vl"),
        seed=20240901,
        dtype="bfloat16",
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, mrope_section=[2, 3, 3], tie_word_embeddings=True),
        vision=dict(depth=2, embed_dim=64, num_heads=4, hidden_size=64),
        layout="legacy",
        shards=1,
        config_style="hub",
    ),
    "untied": dict(
        out=os.path.join(FIXTURES, "tiny-qwen2vl-untied"),
        seed=20240902,
        dtype="float16",
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, mrope_section=[2, 3, 3], tie_word_embeddings=False),
        vision=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=32),
        layout="new",
        shards=2,
        config_style="save_pretrained",
    ),
    "2b": dict(
        out="/tmp/qwen2vl-2b-random",
        seed=20240903,
        dtype="bfloat16",
        text=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, mrope_section=[16, 24, 24], tie_word_embeddings=True),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536),
        layout="legacy",
        shards=2,
        config_style="hub",
    ),
}


def make_config(p):
    from transformers import Qwen2VLConfig

    t, v = p["text"], p["vision"]
    cfg = Qwen2VLConfig(
        vocab_size=151936,
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=t["tie_word_embeddings"],
        rope_theta=1000000.0,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=t["num_hidden_layers"],
        attention_dropout=0.0,
        rope_scaling={"type": "mrope", "mrope_section": list(t["mrope_section"])},
        vision_config=dict(
            depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=v["hidden_size"], hidden_act="quick_gelu",
            mlp_ratio=4, num_heads=v["num_heads"], in_channels=3, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        architectures=["Qwen2VLForConditionalGeneration"],
        torch_dtype=p["dtype"],
        **SPECIAL_IDS,
    )
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    assert sum(t["mrope_section"]) * 2 == head_dim, (t["mrope_section"], head_dim)
    return cfg


def hub_style_config(p):
    """config.json laid out like Qwen2-VL-2B-Instruct's on the hub (keys as there)."""
    t, v = p["text"], p["vision"]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
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
        "max_position_embeddings": 32768,
        "max_window_layers": t["num_hidden_layers"],
        "model_type": "qwen2_vl",
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": t["tie_word_embeddings"],
        "torch_dtype": p["dtype"],
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v["depth"],
            "embed_dim": v["embed_dim"],
            "mlp_ratio": 4,
            "num_heads": v["num_heads"],
            "in_chans": 3,
            "hidden_size": v["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(t["mrope_section"])},
        "vocab_size": 151936,
    }


def _gen(seed, name):
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


def init_tensor(name, shape, seed):
    """Scaled random init for one parameter (float32). See module docstring."""
    g = _gen(seed, name)
    shape = tuple(shape)
    leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else name
    is_bias = name.endswith(".bias")
    norm_like = any(k in name for k in ("layernorm", ".norm.", "norm1", "norm2", "ln_q")) or name.endswith("model.norm.weight")
    if "embed_tokens" in name or name.startswith("lm_head"):
        return torch.randn(shape, generator=g)
    if norm_like:
        if is_bias:
            return torch.randn(shape, generator=g) * 0.1
        return torch.rand(shape, generator=g) * 0.8 + 0.6
    if is_bias:
        return torch.randn(shape, generator=g) * 0.2
    # linear / conv weights: [out, in, ...]
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    gain = {"q_proj": 2.5, "k_proj": 2.5, "qkv": 1.5, "o_proj": 3.0, "down_proj": 3.0}.get(leaf, 1.0)
    return torch.randn(shape, generator=g) * (gain / fan_in ** 0.5)


def build_model(cfg, seed, dtype):
    """Instantiate Qwen2VLForConditionalGeneration in float32 with scaled init, then round
    every weight to the storage dtype (so the float32 model equals the checkpoint)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    sd_dtype = getattr(torch, dtype)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            t = init_tensor(name, prm.shape, seed)
            prm.copy_(t.to(sd_dtype).to(torch.float32))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def legacy_state_dict(model, dtype):
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        sd[k] = v.detach().to(getattr(torch, dtype)).contiguous()
    return sd


def to_new_naming(k):
    """4.49 names -> names used by transformers >= 4.52 checkpoints."""
    if k.startswith("model."):
        return "model.language_model." + k[len("model."):]
    if k.startswith("visual."):
        return "model." + k
    return k  # lm_head.weight


def from_new_naming(k):
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.visual."):
        return k[len("model."):]
    return k


def write_shards(sd, out_dir, n_shards):
    """Write sd as one model.safetensors, or n shards + model.safetensors.index.json."""
    meta = {"format": "pt"}
    if n_shards == 1:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return
    keys = list(sd.keys())
    total = sum(t.numel() * t.element_size() for t in sd.values())
    target = total / n_shards
    shards, cur, cur_size = [], [], 0
    for k in keys:
        cur.append(k)
        cur_size += sd[k].numel() * sd[k].element_size()
        if cur_size >= target and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, cur_size = [], 0
    shards.append(cur)
    assert len(shards) == n_shards, [len(s) for s in shards]
    weight_map = {}
    for i, ks in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: sd[k] for k in ks}, os.path.join(out_dir, fname), metadata=meta)
        for k in ks:
            weight_map[k] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def read_checkpoint(model_dir):
    """All tensors of a checkpoint dir (single file or sharded), names mapped to 4.49's."""
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    files = []
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for fn in files:
        for k, v in load_file(os.path.join(model_dir, fn)).items():
            sd[from_new_naming(k)] = v
    return sd


def load_reference_model(model_dir, dtype=torch.float32, attn_implementation="eager"):
    """Load a checkpoint written by this script as the reference computes with it:
    weights read in their stored dtype, cast to `dtype` (float32), eager attention.
    Single-file legacy checkpoints go through from_pretrained; others (new key naming,
    which 4.49 cannot map) through load_state_dict(strict=True) after renaming."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    idx = os.path.join(model_dir, "model.safetensors.index.json")
    new_naming = False
    if os.path.exists(idx):
        with open(idx) as f:
            new_naming = any(k.startswith("model.language_model.") for k in json.load(f)["weight_map"])
    if not new_naming:
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, torch_dtype=dtype, attn_implementation=attn_implementation
        )
    else:
        cfg = Qwen2VLConfig.from_pretrained(model_dir)
        cfg._attn_implementation = attn_implementation
        cfg.vision_config._attn_implementation = attn_implementation
        model = Qwen2VLForConditionalGeneration(cfg).to(dtype)  # default init, overwritten below
        sd = {k: v.to(dtype) for k, v in read_checkpoint(model_dir).items()}
        if cfg.tie_word_embeddings:
            sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
        model.load_state_dict(sd, strict=True)
    model.eval()
    # the attention classes actually used
    attn_cls = type(model.model.layers[0].self_attn).__name__
    vattn_cls = type(model.visual.blocks[0].attn).__name__
    if attn_implementation == "eager":
        assert attn_cls == "Qwen2VLAttention" and vattn_cls == "VisionAttention", (attn_cls, vattn_cls)
    return model


def write_aux_files(out_dir, cfg_json_obj=None):
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
        f.write("\n")
    for fn in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_DIR, fn), os.path.join(out_dir, fn))
    if cfg_json_obj is not None:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg_json_obj, f, indent=2)
            f.write("\n")


def clean_dir(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for fn in os.listdir(out_dir):
        if fn.endswith((".safetensors", ".json")):
            os.remove(os.path.join(out_dir, fn))


def make_small(preset):
    p = PRESETS[preset]
    out = p["out"]
    cfg = make_config(p)
    model = build_model(cfg, p["seed"], p["dtype"])
    clean_dir(out)
    sd = legacy_state_dict(model, p["dtype"])
    if p["layout"] == "new":
        sd = {to_new_naming(k): v for k, v in sd.items()}
    write_shards(sd, out, p["shards"])
    if p["config_style"] == "hub":
        write_aux_files(out, hub_style_config(p))
    else:
        cfg.save_pretrained(out)  # config.json as 4.49 writes it
        cpath = os.path.join(out, "config.json")
        with open(cpath) as f:
            cj = json.load(f)
        cj.pop("_attn_implementation_autoset", None)
        with open(cpath, "w") as f:
            json.dump(cj, f, indent=2, sort_keys=True)
            f.write("\n")
        write_aux_files(out)
    verify(out, model)
    print(f"{preset}: wrote {out}")
    for fn in sorted(os.listdir(out)):
        print(f"  {fn:40s} {os.path.getsize(os.path.join(out, fn)):>10d}")


def verify(out, model_ref):
    """Reload as the reference does and check weights and config are identical."""
    m = load_reference_model(out)
    a, b = model_ref.state_dict(), m.state_dict()
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), k
    c1, c2 = model_ref.config, m.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps",
                "rope_scaling", "image_token_id", "video_token_id", "vision_start_token_id"):
        assert getattr(c1, key) == getattr(c2, key), (key, getattr(c1, key), getattr(c2, key))
    for key in ("depth", "embed_dim", "hidden_size", "num_heads", "mlp_ratio", "in_channels", "patch_size",
                "spatial_merge_size", "temporal_patch_size", "hidden_act"):
        assert getattr(c1.vision_config, key) == getattr(c2.vision_config, key), key


def make_2b(out):
    """Real 2B shapes, bf16, built tensor by tensor (peak memory ~ one shard)."""
    from transformers import Qwen2VLForConditionalGeneration

    p = dict(PRESETS["2b"])
    p["out"] = out
    cfg = make_config(p)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    del model
    os.makedirs(out, exist_ok=True)
    clean_dir(out)
    total = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    n = p["shards"]
    target = total / n
    shard, shard_size, shard_no, weight_map = {}, 0, 1, {}

    def flush(shard, no):
        fname = f"model-{no:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = fname
        print(f"  wrote {fname} ({len(shard)} tensors)", flush=True)

    for k, s in shapes:
        t = init_tensor(k, s, p["seed"]).to(torch.bfloat16)
        sz = t.numel() * 2
        if shard and shard_size + sz > target and shard_no < n:
            flush(shard, shard_no)
            shard, shard_size, shard_no = {}, 0, shard_no + 1
        shard[k] = t
        shard_size += sz
    flush(shard, shard_no)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    write_aux_files(out, hub_style_config(p))
    print(f"2b: wrote {out}, {total / 1e9:.2f} GB of weights")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "untied", "both", "2b"], default="both")
    ap.add_argument("--out", help="output dir (only for --preset 2b; default /tmp/qwen2vl-2b-random)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.preset == "2b":
        make_2b(args.out or PRESETS["2b"]["out"])
    elif args.preset == "both":
        make_small("tiny")
        make_small("untied")
    else:
        if args.out:
            sys.exit("--out is only for --preset 2b")
        make_small(args.preset)


if __name__ == "__main__":
    main()
