#!/usr/bin/env python3
"""Build random-weight Qwen2 *text* checkpoints (`Qwen2ForCausalLM`) with transformers 4.49.0
and record what the reference computes with them.

Presets (both written under tests/fixtures/):
  tiny-qwen2         hidden 16, 3 layers, 2 heads / 1 kv head (head_dim 8), tied embeddings,
                     bf16, config.json as 4.49's save_pretrained writes it (sliding_window
                     32768, max_window_layers 3, use_sliding_window false, rope_scaling null:
                     the keys of Qwen2-0.5B-Instruct's config).
  tiny-qwen2-untied  hidden 16, 2 layers, 4 heads / 2 kv heads (head_dim 4), untied lm_head,
                     fp16 (sliding_window 131072 as in Qwen2-7B-Instruct's config).
  tiny-qwen2-moe     Qwen2MoeForCausalLM: hidden 16, 2 layers (layer 0 a sparse MoE block of 4
                     experts, top-2, norm_topk_prob false, a shared expert behind a sigmoid
                     gate; layer 1 dense via mlp_only_layers), tied, bf16.

The tokenizer is the Qwen2-VL one of tests/fixtures/tokenizer (its ids are those of the
Qwen2 / Qwen2.5 tokenizers for every ordinary token and for <|endoftext|>, <|im_start|>,
<|im_end|>); tokenizer_config.json carries the Qwen2-Instruct chat template under
"chat_template" (a Qwen2 text checkpoint ships no chat_template.json and no
preprocessor_config.json, and neither does this fixture).

Weights: the scaled random init of make_tiny_model.py (same per-tensor generators), rounded to
the storage dtype; the reference model computes in float32 with eager attention.

Reference outputs: tests/fixtures/<preset>/reference.safetensors and reference.json. For each
case (a conversation):
  <case>.input_ids   int64 (n,)       tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  <case>.logits      float32 (vocab,) last position of the prefill
  <case>.layer0_out  float32 (n, hidden) output of decoder layer 0
  <case>.greedy_ids  int64 (k,)       generate(do_sample=False, max_new_tokens=24, repetition_penalty=1)
reference.json holds the messages of each case.

Sliding window ("swa", after tiny-qwen2): see build_swa; writes
tests/fixtures/tiny-qwen2/reference-swa.{safetensors,json} and leaves the checkpoint as it is.

Usage:
  tools/reference/.venv/bin/python tools/reference/make_qwen2_text.py [PRESET ... | swa]
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from make_tiny_model import FIXTURES, TOKENIZER_DIR, init_tensor

# Qwen2-7B-Instruct's tokenizer_config.json "chat_template".
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2-7B-Instruct's generation_config.json
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.49.0",
}

# Qwen2MoeForCausalLM (57B-A14B's layout: routed experts, top-k without renormalising,
# a shared expert behind a sigmoid gate): layer 0 sparse, layer 1 dense (mlp_only_layers).
MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=24,
    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
)

PRESETS = {
    "tiny-qwen2": dict(
        seed=20250101, dtype="bfloat16", hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=48, tie_word_embeddings=True, sliding_window=32768,
        max_position_embeddings=32768,
    ),
    "tiny-qwen2-untied": dict(
        seed=20250102, dtype="float16", hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False, sliding_window=131072,
        max_position_embeddings=32768,
    ),
    "tiny-qwen2-moe": dict(
        seed=20250103, dtype="bfloat16", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True, sliding_window=32768,
        max_position_embeddings=32768, moe=MOE,
    ),
}

CASES = {
    "hello": [{"role": "user", "content": "Hello! Who are you?"}],
    "two_turns": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? Count 1, 2, 3 too."},
    ],
}

MAX_NEW = 24


def make_config(p):
    from transformers import Qwen2Config, Qwen2MoeConfig

    if "moe" in p:
        return Qwen2MoeConfig(
            vocab_size=151936, hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
            num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
            num_key_value_heads=p["num_key_value_heads"], hidden_act="silu",
            max_position_embeddings=p["max_position_embeddings"], initializer_range=0.02, rms_norm_eps=1e-6,
            use_cache=True, tie_word_embeddings=p["tie_word_embeddings"], rope_theta=1000000.0,
            rope_scaling=None, use_sliding_window=False, sliding_window=p["sliding_window"],
            max_window_layers=p["num_hidden_layers"], attention_dropout=0.0, bos_token_id=151643,
            eos_token_id=151645, architectures=["Qwen2MoeForCausalLM"], torch_dtype=p["dtype"],
            router_aux_loss_coef=0.001, output_router_logits=False, **p["moe"],
        )
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        hidden_act="silu",
        max_position_embeddings=p["max_position_embeddings"],
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=p["tie_word_embeddings"],
        rope_theta=1000000.0,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=p["sliding_window"],
        max_window_layers=p["num_hidden_layers"],
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        architectures=["Qwen2ForCausalLM"],
        torch_dtype=p["dtype"],
    )


def build(name):
    from transformers import AutoTokenizer, Qwen2ForCausalLM, Qwen2MoeForCausalLM

    p = PRESETS[name]
    cls = Qwen2MoeForCausalLM if "moe" in p else Qwen2ForCausalLM
    out = os.path.join(FIXTURES, name)
    os.makedirs(out, exist_ok=True)
    for fn in os.listdir(out):
        os.remove(os.path.join(out, fn))
    cfg = make_config(p)
    torch.manual_seed(p["seed"])
    model = cls(cfg).eval()
    sd_dtype = getattr(torch, p["dtype"])
    with torch.no_grad():
        for pname, prm in model.named_parameters():
            prm.copy_(init_tensor(pname, prm.shape, p["seed"]).to(sd_dtype).to(torch.float32))
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        sd[k] = v.detach().to(sd_dtype).contiguous()
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    cpath = os.path.join(out, "config.json")
    with open(cpath) as f:
        cj = json.load(f)
    cj.pop("_attn_implementation_autoset", None)
    with open(cpath, "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
        f.write("\n")
    shutil.copyfile(os.path.join(TOKENIZER_DIR, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["chat_template"] = QWEN2_CHAT_TEMPLATE
    tc.pop("processor_class", None)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # The reference, as a user runs it: from_pretrained in float32, eager attention.
    ref = cls.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert type(ref.model.layers[0].self_attn).__name__ in ("Qwen2Attention", "Qwen2MoeAttention")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    tok = AutoTokenizer.from_pretrained(out)
    tensors, meta = {}, {}
    for case, messages in CASES.items():
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            o = ref(input_ids=ids, output_hidden_states=True)
            gen = ref.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                max_new_tokens=MAX_NEW, repetition_penalty=1.0, temperature=None, top_p=None,
                top_k=None, eos_token_id=[151645, 151643], pad_token_id=151643,
            )
        tensors[f"{case}.input_ids"] = ids[0].to(torch.int64).contiguous()
        tensors[f"{case}.logits"] = o.logits[0, -1].float().contiguous()
        tensors[f"{case}.layer0_out"] = o.hidden_states[1][0].float().contiguous()
        tensors[f"{case}.greedy_ids"] = gen[0, ids.shape[1]:].to(torch.int64).contiguous()
        top = torch.topk(o.logits[0, -1], 2).values
        meta[case] = {
            "messages": messages,
            "prompt": tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            "top2_gap": float(top[0] - top[1]),
            "greedy_text": tok.decode(tensors[f"{case}.greedy_ids"]),
        }
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"max_new_tokens": MAX_NEW, "cases": meta}, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"{name}: wrote {out}")
    for fn in sorted(os.listdir(out)):
        print(f"  {fn:32s} {os.path.getsize(os.path.join(out, fn)):>10d}")
    for case, m in meta.items():
        print(f"  {case}: {len(tensors[case + '.input_ids'])} prompt tokens, "
              f"{len(tensors[case + '.greedy_ids'])} greedy, top-2 gap {m['top2_gap']:.3f}")


# The sliding-window reference: tests/fixtures/tiny-qwen2 with these config.json changes.
SWA = dict(sliding_window=12, use_sliding_window=True, max_window_layers=1)
SWA_CASE = "two_turns"


def build_swa():
    """tests/fixtures/tiny-qwen2/reference-swa.{safetensors,json}: tiny-qwen2 with a 12-token
    sliding window (SWA) on a 60-token prompt, as transformers 4.49 computes it in eager and in
    SDPA attention (the default; both mask keys more than `sliding_window` positions back, in
    every layer, whatever `max_window_layers` says: Qwen2Model._prepare_4d_causal_attention_mask_
    with_cache_position; only flash_attention_2 reads max_window_layers). Records, for the case
    SWA_CASE: input_ids, every position's hidden state after the last layer and the final norm,
    the last position's logits, the greedy continuation (its decode steps see the window
    too), and, to show the window matters, the last logits without it."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    out = os.path.join(FIXTURES, "tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(CASES[SWA_CASE], add_generation_prompt=True, return_tensors="pt")
    res = {}
    for impl in ["eager", "sdpa"]:
        m = Qwen2ForCausalLM.from_pretrained(
            out, torch_dtype=torch.float32, attn_implementation=impl, **SWA
        ).eval()
        assert m.config.sliding_window == SWA["sliding_window"] and m.config.use_sliding_window
        with torch.no_grad():
            o = m(input_ids=ids, output_hidden_states=True)
            gen = m.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                max_new_tokens=MAX_NEW, repetition_penalty=1.0, temperature=None, top_p=None,
                top_k=None, eos_token_id=[151645, 151643], pad_token_id=151643,
            )
        res[impl] = (o, gen)
    o, gen = res["sdpa"]
    e, egen = res["eager"]
    assert torch.equal(gen, egen), "eager and sdpa disagree on the greedy tokens"
    assert (o.logits - e.logits).abs().max() < 1e-4
    plain = Qwen2ForCausalLM.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="sdpa", sliding_window=None
    ).eval()
    with torch.no_grad():
        p = plain(input_ids=ids)
    tensors = {
        "input_ids": ids[0].to(torch.int64).contiguous(),
        "final_hidden": o.hidden_states[-1][0].float().contiguous(),
        "logits": o.logits[0, -1].float().contiguous(),
        "greedy_ids": gen[0, ids.shape[1]:].to(torch.int64).contiguous(),
        "logits_no_window": p.logits[0, -1].float().contiguous(),
    }
    # hidden_states[-1] is the last layer's output after the final norm (4.49 appends each
    # layer's input, then the normed output: [-2] is the last layer's *input*).
    save_file(tensors, os.path.join(out, "reference-swa.safetensors"))
    meta = {
        "config": SWA,
        "messages": CASES[SWA_CASE],
        "prompt_tokens": int(ids.shape[1]),
        "max_new_tokens": MAX_NEW,
        "max_abs_logit_change_from_the_window": float((tensors["logits"] - tensors["logits_no_window"]).abs().max()),
        "greedy_text": tok.decode(tensors["greedy_ids"]),
    }
    with open(os.path.join(out, "reference-swa.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"tiny-qwen2 SWA: {meta}")


def main():
    import sys

    torch.set_num_threads(1)
    names = sys.argv[1:] or [*PRESETS, "swa"]
    for name in names:
        if name == "swa":
            build_swa()
        else:
            build(name)


if __name__ == "__main__":
    main()
