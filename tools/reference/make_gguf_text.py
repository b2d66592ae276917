#!/usr/bin/env python3
"""Convert the tiny Qwen2 text models with llama.cpp's own converter and record the layout.

    QWEN2VL_WRITE_SPARSE_MOE=/tmp/tiny-qwen2moe cargo test -p qwen2vl --test gguf_text \
        sparse_moe_checkpoint_is_written
    PYTHONPATH=$LLAMA_CPP/gguf-py python tools/reference/make_gguf_text.py \
        --llama-cpp $LLAMA_CPP --moe /tmp/tiny-qwen2moe [--out DIR]

(the python needs torch, transformers and sentencepiece: the peers' `venv-convert`, see
`../shared/peers/README.md`) converts, with `convert_hf_to_gguf.py` of the llama.cpp tree given
(commit 0c1e570 was used),

- `tests/fixtures/tiny-qwen2` (a `Qwen2ForCausalLM`, arch `qwen2`) and
- the all-sparse `Qwen2MoeForCausalLM` that `tests/gguf_text.rs` generates from a fixed seed
  (arch `qwen2moe`; `tests/fixtures/tiny-qwen2-moe` has a dense layer, `mlp_only_layers`,
  which llama.cpp's qwen2moe cannot hold: "Can not map tensor
  'model.layers.1.mlp.down_proj.weight'"),

each to f16 and q8_0 files under DIR (default /tmp/qwen2vl-gguf-text; ~10 and ~15 MB, not
committed), and writes `tests/fixtures/gguf/llamacpp-qwen2-text.json`: every metadata key of
the four files with its type and value, and every tensor with its ggml type, `ne` and the
sha256 of its bytes (the manifest format of `make_gguf_models.py`). `tests/gguf_text.rs`
writes the same files with the engine's exporter and holds them to it (the f16 files byte
for byte); with QWEN2VL_LLAMACPP_TEXT_GGUF_DIR=DIR it also loads the converter's own files,
and DIR/tiny-qwen2moe-q4_k_m.gguf when present, made by llama.cpp's own quantizer:

    llama-quantize DIR/tiny-qwen2moe-f16.gguf DIR/tiny-qwen2moe-q4_k_m.gguf Q4_K_M

(its rows of 32 values fit no k-quant: the experts become llama-quantize's q5_0 fallback).

llama.cpp's qwen2moe loader requires `output.weight`, so neither the converter's file nor ours
of this tied model loads there (real Qwen2 MoE checkpoints are untied; an untied variant of
this model exported by `qwen2vl quantize` passed llama.cpp's tensor checks).
"""

import argparse
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sibling():
    spec = importlib.util.spec_from_file_location(
        "make_gguf_models", Path(__file__).with_name("make_gguf_models.py")
    )
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree")
    ap.add_argument("--moe", required=True, type=Path, help="the sparse MoE checkpoint")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen2vl-gguf-text"))
    a = ap.parse_args()
    m = sibling()
    llama = a.llama_cpp.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    models = {
        "tiny-qwen2": ROOT / "tests/fixtures/tiny-qwen2",
        "tiny-qwen2moe": a.moe.resolve(),
    }
    manifest = {
        "source": "llama.cpp convert_hf_to_gguf.py (commit 0c1e570) on tests/fixtures/tiny-qwen2 "
        "and tests/gguf_text.rs's sparse MoE checkpoint",
        "files": {},
    }
    for stem, model in models.items():
        for outtype in ["f16", "q8_0"]:
            name = f"{stem}-{outtype}.gguf"
            out = a.out / name
            m.convert(llama, [str(model), "--outtype", outtype, "--outfile", str(out)])
            manifest["files"][name] = m.describe(out)
            print(f"{out}: {out.stat().st_size} bytes")
    path = ROOT / "tests/fixtures/gguf/llamacpp-qwen2-text.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
