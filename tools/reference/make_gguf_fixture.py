#!/usr/bin/env python3
"""Small GGUF files written by llama.cpp's own Python writer (gguf-py), for the Rust reader.

Writes, under tests/fixtures/gguf/ (issue 12):
  - tiny.gguf: the metadata shapes llama.cpp's converter writes for Qwen2-VL (architecture,
    u32 hyper-parameters, f32 rope base, the i32 array rope.dimension_sections, tokenizer
    string and i32 arrays with non-ASCII tokens, a bool, f32 arrays) plus one key of every
    other scalar and array type; tensors of types f32, f16, bf16, q8_0, q4_0, q4_K, i32 in 1,
    2 and 4 dimensions, default alignment (32, no general.alignment key);
  - align64.gguf: general.alignment = 64 and two tensors;
  - expected.json: what each file holds (every key with its gguf type and value, every tensor
    with its ggml type id, ne in file order, byte length and FNV-1a 64 hash of its bytes),
    which crates/qwen2vl/tests/gguf.rs compares with what our reader reads.

Deterministic (fixed seeds; gguf-py writes keys and tensors in insertion order).

Environment: any Python 3 with numpy and the PyPI package `gguf` (made with gguf 0.19.0,
numpy 2.4.6):
    python3 -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install gguf
    /tmp/ggufvenv/bin/python tools/reference/make_gguf_fixture.py

`--check FILE` reads a GGUF written by our writer with gguf-py's GGUFReader and prints its
keys and tensors (the hand cross-check of the writer; CI has no Python):
    mkdir -p /tmp/ggufdump
    QWEN2VL_GGUF_DUMP_DIR=/tmp/ggufdump cargo test -p qwen2vl --test gguf round_trips
    for f in /tmp/ggufdump/*.gguf; do python tools/reference/make_gguf_fixture.py --check $f; done
(tools/reference/gguf_llamacpp_check.cpp does the same with llama.cpp's C reader.)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gguf"


def fnv1a64(b: bytes) -> str:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def tiny(path: Path) -> dict:
    rng = np.random.default_rng(12)
    w = gguf.GGUFWriter(str(path), "qwen2vl", use_temp_file=False)
    meta = {}

    def add(kind, key, value, vtype, sub=None, expect=None):
        if kind == "arr":
            w.add_key_value(key, value, V.ARRAY, sub_type=sub)
            meta[key] = {"type": "array", "element": sub.name.lower(), "value": expect if expect is not None else list(value)}
        else:
            w.add_key_value(key, value, vtype)
            meta[key] = {"type": vtype.name.lower(), "value": expect if expect is not None else value}

    meta["general.architecture"] = {"type": "string", "value": "qwen2vl"}
    add("s", "general.name", "tiny qwen2vl fixture", V.STRING)
    add("s", "general.file_type", 7, V.UINT32)
    add("s", "qwen2vl.block_count", 2, V.UINT32)
    add("s", "qwen2vl.context_length", 32768, V.UINT32)
    add("s", "qwen2vl.rope.freq_base", 1000000.0, V.FLOAT32)
    add("s", "qwen2vl.attention.layer_norm_rms_epsilon", 1e-6, V.FLOAT32,
        expect=float(np.float32(1e-6)))
    # What the converter writes: a Python int list, which gguf-py types as INT32.
    w.add_array("qwen2vl.rope.dimension_sections", [16, 24, 24, 0])
    meta["qwen2vl.rope.dimension_sections"] = {"type": "array", "element": "int32", "value": [16, 24, 24, 0]}
    tokens = ["!", "Ġhello", "你好", "<|im_start|>", "<|im_end|>", "", "ĊĊ"]
    w.add_array("tokenizer.ggml.tokens", tokens)
    meta["tokenizer.ggml.tokens"] = {"type": "array", "element": "string", "value": tokens}
    add("arr", "tokenizer.ggml.token_type", [1, 1, 1, 3, 3, 5, 1], None, sub=V.INT32)
    add("arr", "tokenizer.ggml.merges", ["Ġ h", "he llo"], None, sub=V.STRING)
    add("s", "tokenizer.ggml.add_bos_token", False, V.BOOL)
    add("s", "tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}", V.STRING)
    mean = [0.48145466, 0.4578275, 0.40821073]
    add("arr", "clip.vision.image_mean", mean, None, sub=V.FLOAT32,
        expect=[float(np.float32(x)) for x in mean])
    # One of every other scalar type, with boundary values.
    add("s", "test.u8", 255, V.UINT8)
    add("s", "test.i8", -128, V.INT8)
    add("s", "test.u16", 65535, V.UINT16)
    add("s", "test.i16", -32768, V.INT16)
    add("s", "test.i32", -2147483648, V.INT32)
    add("s", "test.u64", 2**64 - 1, V.UINT64)
    add("s", "test.i64", -(2**63), V.INT64)
    add("s", "test.f64", -2.5e300, V.FLOAT64)
    add("s", "test.bool", True, V.BOOL)
    add("arr", "test.array_u8", [0, 1, 255], None, sub=V.UINT8)
    add("arr", "test.array_i8", [-128, 0, 127], None, sub=V.INT8)
    add("arr", "test.array_u16", [0, 65535], None, sub=V.UINT16)
    add("arr", "test.array_i16", [-32768, 32767], None, sub=V.INT16)
    add("arr", "test.array_u32", [0, 4294967295], None, sub=V.UINT32)
    add("arr", "test.array_u64", [0, 2**64 - 1], None, sub=V.UINT64)
    add("arr", "test.array_i64", [-(2**63), 2**63 - 1], None, sub=V.INT64)
    add("arr", "test.array_f64", [0.1, -1e-300], None, sub=V.FLOAT64)
    add("arr", "test.array_bool", [True, False, True], None, sub=V.BOOL)

    tensors = []

    def tensor(name, data, raw_dtype=None):
        w.add_tensor(name, data, raw_dtype=raw_dtype)
        tensors.append((name, data, raw_dtype))

    tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float16))
    tensor("blk.0.attn_norm.weight", np.arange(32, dtype=np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0)
    tensor("blk.0.attn_q.weight", q8, Q.Q8_0)
    tensor("blk.0.attn_q.bias", np.array([0.5, -1.0, 2.0, 3.25], dtype=np.float32))
    q4 = gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), Q.Q4_0)
    tensor("blk.0.attn_k.weight", q4, Q.Q4_0)
    # q4_K: gguf-py cannot quantize it; raw blocks (2 rows of one 144-byte super-block).
    tensor("blk.0.ffn_down.weight", rng.integers(0, 256, (2, 144), dtype=np.uint8), Q.Q4_K)
    bf = gguf.quants.quantize(rng.standard_normal((3, 8)).astype(np.float32), Q.BF16)
    tensor("blk.0.ffn_up.weight", bf, Q.BF16)
    tensor("v.patch_embd.weight", rng.standard_normal((2, 3, 2, 2)).astype(np.float32))
    tensor("test.i32", np.array([-1, 0, 1, 2**31 - 1, -(2**31)], dtype=np.int32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"metadata": meta, "tensors": describe(path)}


def describe(path: Path) -> dict:
    """Every tensor as gguf-py's reader sees it."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        raw = bytes(np.asarray(t.data).tobytes())
        out[t.name] = {
            "type": int(t.tensor_type),
            "ne": [int(x) for x in t.shape],  # gguf-py's shape is in file (ne) order
            "nbytes": int(t.n_bytes),
            "offset": int(t.data_offset),
            "fnv1a64": fnv1a64(raw),
        }
    return out


def align64(path: Path) -> dict:
    w = gguf.GGUFWriter(str(path), "clip", use_temp_file=False)
    w.add_custom_alignment(64)
    w.add_string("clip.projector_type", "qwen2vl_merger")
    w.add_tensor("v.post_ln.weight", np.linspace(-1, 1, 5, dtype=np.float32))
    w.add_tensor("mm.0.weight", np.ones((3, 6), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = {
        "general.architecture": {"type": "string", "value": "clip"},
        "general.alignment": {"type": "uint32", "value": 64},
        "clip.projector_type": {"type": "string", "value": "qwen2vl_merger"},
    }
    return {"metadata": meta, "tensors": describe(path)}


def check(path: str) -> None:
    r = gguf.GGUFReader(path)
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        kind = f.types[0].name if f.types else "?"
        if f.types and f.types[0] == V.ARRAY:
            kind = f"ARRAY of {f.types[-1].name} ({len(f.data)})"
        print(f"key {f.name}: {kind} = {f.contents()!r}"[:200])
    for t in r.tensors:
        raw = bytes(np.asarray(t.data).tobytes())
        print(f"tensor {t.name}: {t.tensor_type.name} ne {list(map(int, t.shape))} "
              f"{t.n_bytes} bytes at {t.data_offset} fnv1a64 {fnv1a64(raw)}")
    print(f"gguf-py {gguf.__name__} read {path}: {len(r.fields)} fields, {len(r.tensors)} tensors, "
          f"alignment {r.alignment}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", help="read this GGUF with gguf-py and print it")
    args = ap.parse_args()
    if args.check:
        check(args.check)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {
        "tiny.gguf": tiny(OUT / "tiny.gguf"),
        "align64.gguf": align64(OUT / "align64.gguf"),
        "made_with": {"gguf": getattr(gguf, "__version__", None) or _dist_version(), "numpy": np.__version__},
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes", file=sys.stderr)


def _dist_version() -> str:
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
