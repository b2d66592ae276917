#!/usr/bin/env python3
"""Convert the tiny Qwen2-VL fixture with llama.cpp's own converter and record the layout.

    PYTHONPATH=$LLAMA_CPP/gguf-py tools/reference/.venv/bin/python \
        tools/reference/make_gguf_models.py --llama-cpp $LLAMA_CPP [--out DIR] [--model DIR]

writes, with `convert_hf_to_gguf.py` of the llama.cpp tree given (commit 0c1e570 was used):

- DIR/tiny-qwen2vl-f16.gguf, DIR/tiny-qwen2vl-q8_0.gguf (the text model, arch `qwen2vl`) and
  DIR/mmproj-tiny-qwen2vl-f16.gguf (the vision projector, arch `clip`), DIR defaulting to
  /tmp/qwen2vl-gguf (the text files are ~25 MB and ~16 MB: the 151,936-row embedding and the
  tokenizer's 152k tokens and 151k merges; too big to commit);
- tests/fixtures/gguf/mmproj-tiny-qwen2vl-f16.gguf (small, committed) and
- tests/fixtures/gguf/llamacpp-tiny-qwen2vl.json: every metadata key of the three files with
  its type and value (long arrays as type, length and sha256 of their elements), and every
  tensor with its ggml type, `ne` and the sha256 of its bytes.

`tests/gguf_model.rs` writes the same files from the safetensors fixture with the engine's
own GGUF writer, in the converter's layout, and holds them to this manifest (keys, types,
values, tensor names, types and `ne`), so the loader is tested on the converter's layout
without committing 25 MB. With QWEN2VL_LLAMACPP_GGUF_DIR=DIR it also compares the
converter's own text files with ours (the f16 file: every tensor and key byte for byte; the
q8_0 file: every key, and the same greedy tokens, since gguf-py's Q8_0 rounding differs from
ours in a few blocks) and loads them.

One fix is applied to the converter at run time: its tensor-name map covers block ids below
the vision depth only, so `visual.merger.mlp.2` cannot be mapped for a 2-block tower ("Can
not map tensor 'visual.merger.mlp.2.bias'"; the released models have 32 blocks). The map is
built for at least 3 blocks here; nothing else changes.

With --qwen25 it converts tests/fixtures/tiny-qwen25vl instead, vision projector only:
tests/fixtures/gguf/mmproj-tiny-qwen25vl-f16.gguf (`clip.projector_type = "qwen2.5vl_merger"`,
`clip.vision.n_wa_pattern = 2`, SwiGLU `ffn_gate/up/down`; made with llama.cpp's converter as of
its `conversion/qwenvl.py` layout, commit not recorded in that checkout). `tests/gguf_qwen25vl.rs`
pairs it with a text file written by the engine's exporter (the decoder is Qwen2-VL's).

sentencepiece must be importable (the converter imports it before falling back to the GPT-2
vocabulary): `pip install --target /tmp/convpkgs sentencepiece` and add it to PYTHONPATH.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUNNER = r"""
import sys
sys.path.insert(0, {llama!r})
import gguf
_orig = gguf.get_tensor_name_map
def _map(arch, n_blocks):
    return _orig(arch, max(n_blocks, 3))
gguf.get_tensor_name_map = _map
import conversion.base
conversion.base.gguf.get_tensor_name_map = _map
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py"] + {args!r}
convert_hf_to_gguf.main()
"""


def convert(llama: Path, args: list[str]) -> None:
    code = RUNNER.format(llama=str(llama), args=args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(llama / "gguf-py"), str(llama)] + env.get("PYTHONPATH", "").split(os.pathsep)
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=llama)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def describe(path: Path) -> dict:
    import gguf  # noqa: PLC0415 (after PYTHONPATH is set)
    import numpy as np  # noqa: PLC0415

    r = gguf.GGUFReader(str(path))
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [gguf.GGUFValueType(t).name for t in field.types]
        if types[0] == "ARRAY":
            if types[1] == "STRING":
                items = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
                if len(items) <= 8:
                    value = items
                else:
                    value = {"len": len(items), "sha256": sha("\n".join(items).encode())}
            else:
                arr = [field.parts[i].tolist()[0] for i in field.data]
                if len(arr) <= 8:
                    value = arr
                else:
                    raw = b"".join(bytes(field.parts[i]) for i in field.data)
                    value = {"len": len(arr), "sha256": sha(raw)}
        elif types[0] == "STRING":
            s = bytes(field.parts[-1]).decode("utf-8")
            value = s if len(s) <= 200 else {"len": len(s), "sha256": sha(s.encode())}
        else:
            value = field.parts[-1].tolist()[0]
            if isinstance(value, float):
                value = float(np.float32(value))
        meta[name] = {"type": "/".join(types), "value": value}
    tensors = {}
    for t in r.tensors:
        tensors[t.name] = {
            "type": gguf.GGMLQuantizationType(t.tensor_type).name,
            "ne": [int(x) for x in t.shape],
            "sha256": sha(bytes(t.data.tobytes())),
        }
    return {"metadata": meta, "tensors": tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree")
    ap.add_argument("--model", type=Path, default=ROOT / "tests/fixtures/tiny-qwen2vl")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen2vl-gguf"))
    ap.add_argument("--qwen25", action="store_true", help="the tiny Qwen2.5-VL's mmproj only")
    a = ap.parse_args()
    llama = a.llama_cpp.resolve()
    sys.path.insert(0, str(llama / "gguf-py"))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.qwen25:
        name = "mmproj-tiny-qwen25vl-f16.gguf"
        out = a.out / name
        convert(llama, [str(ROOT / "tests/fixtures/tiny-qwen25vl"), "--mmproj", "--outtype", "f16",
                        "--outfile", str(out)])
        shutil.copy(out, ROOT / "tests/fixtures/gguf" / name)
        print(f"wrote {ROOT / 'tests/fixtures/gguf' / name}")
        return
    files = {
        "tiny-qwen2vl-f16.gguf": ["--outtype", "f16"],
        "tiny-qwen2vl-q8_0.gguf": ["--outtype", "q8_0"],
        "mmproj-tiny-qwen2vl-f16.gguf": ["--mmproj", "--outtype", "f16"],
    }
    manifest = {
        "source": "llama.cpp convert_hf_to_gguf.py (commit 0c1e570) on tests/fixtures/tiny-qwen2vl",
        "files": {},
    }
    for name, extra in files.items():
        out = a.out / name
        convert(llama, [str(a.model.resolve()), *extra, "--outfile", str(out)])
        manifest["files"][name] = describe(out)
        print(f"{out}: {out.stat().st_size} bytes")
    fixtures = ROOT / "tests/fixtures/gguf"
    shutil.copy(a.out / "mmproj-tiny-qwen2vl-f16.gguf", fixtures / "mmproj-tiny-qwen2vl-f16.gguf")
    (fixtures / "llamacpp-tiny-qwen2vl.json").write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {fixtures / 'llamacpp-tiny-qwen2vl.json'}")


if __name__ == "__main__":
    main()
