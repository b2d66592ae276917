#!/usr/bin/env python3
"""Writes tests/fixtures/resize/: what Pillow 13.0's bicubic resize, qwen-vl-utils 0.0.8's and
transformers 4.49's smart_resize, and the whole image preprocessing (fetch_image +
Qwen2VLImageProcessor) compute, for the Rust tests in crates/qwen2vl/src/ops/resize.rs,
crates/qwen2vl/src/processing/sizes.rs (smart_resize) and crates/qwen2vl/src/processing/image.rs
(preprocessing).

Run with the pinned reference environment (tools/reference/requirements.txt):

    tools/reference/.venv/bin/python tools/reference/make_resize_fixtures.py

Only Pillow 13.0.0 and numpy are required for the resize and smart_resize parts; the
preprocessing part is skipped (with a message) when transformers / qwen_vl_utils cannot be
imported.

Layout of tests/fixtures/resize/ (all little-endian, row-major):
  cases.json          index of everything below (versions, sizes, file names, offsets)
  src_<name>.png      source images (8-bit RGB PNG, lossless)
  out_<name>_<w>x<h>.png  Pillow's `src.resize((w, h), Image.BICUBIC)`
  fuzz.bin            many small random cases packed: for each case, the source bytes
                      (h, w, 3) u8 then Pillow's output (oh, ow, 3) u8, at the offsets listed
                      in cases.json["fuzz"]
  pv_<name>.f32       reference pixel_values, raw float32 (n_patches, 1176), shape in
                      cases.json["preprocess"]

With --decode-dir DIR it writes images in every supported format (and some awkward modes) with
Pillow's `Image.open(f).convert("RGB")` bytes beside them, for the ignored Rust test
`decode_parity_external` (env QWEN2VL_DECODE_PARITY=DIR): it reports how far the image crate's
decoders are from Pillow's.

With --fuzz-dir DIR --fuzz-count N it instead writes a large fuzz.bin + fuzz.json into DIR (not
committed) for the ignored Rust test `resize_fuzz_external` (env QWEN2VL_RESIZE_FUZZ=DIR).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import PIL
from PIL import Image

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "resize")


def pattern(w, h, seed, noise_box=None):
    """Deterministic RGB test image: gradients, hard-edged stripes and checks (overshoot →
    clipping), a disc, and seeded noise (everywhere, or only inside noise_box=(x0,y0,x1,y1))."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 255 * x / max(w - 1, 1)
    img[..., 1] = 255 * y / max(h - 1, 1)
    img[..., 2] = 255 * (x + y) / max(w + h - 2, 1)
    stripes = ((x // 4 + y // 6) % 2 == 0)
    band = (y >= h * 0.3) & (y < h * 0.5)
    img[band & stripes] = [255, 255, 255]
    img[band & ~stripes] = [0, 0, 0]
    disc = (x - w * 0.7) ** 2 + (y - h * 0.7) ** 2 < (min(w, h) * 0.15) ** 2
    img[disc] = [250, 10, 30]
    noise = rng.integers(0, 256, size=(h, w, 3))
    if noise_box is None:
        img = 0.5 * img + 0.5 * noise
    else:
        x0, y0, x1, y1 = noise_box
        img[y0:y1, x0:x1] = noise[y0:y1, x0:x1]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def noise(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def vertical_first(iw, ih, ow, oh):
    dy, dx = ih - oh, iw - ow
    return dy > 0 and dy > dx * 2


# name -> (image, [targets (w, h)])
def resize_cases():
    return {
        "noise_37x23": (noise(37, 23, 1), [(84, 56), (112, 56), (20, 40), (37, 60), (90, 23)]),
        "pattern_640x480": (
            pattern(640, 480, 2, noise_box=(300, 200, 364, 264)),
            [(644, 476), (320, 240), (28, 28), (200, 300)],
        ),
        "pattern_1000x700": (
            pattern(1000, 700, 3, noise_box=(10, 10, 60, 60)),
            [(700, 490), (252, 168), (56, 812)],
        ),
        "pattern_301x97": (pattern(301, 97, 4, noise_box=(0, 0, 40, 97)), [(602, 84), (84, 392)]),
        "pattern_97x301": (pattern(97, 301, 5, noise_box=(0, 0, 97, 30)), [(392, 84)]),
        "noise_1x50": (noise(1, 50, 6), [(28, 56), (1, 28), (3, 50)]),
        "noise_50x1": (noise(50, 1, 7), [(56, 28), (28, 1), (50, 4)]),
        "noise_1x1": (noise(1, 1, 8), [(28, 28), (1, 3)]),
        "pattern_1000x5": (pattern(1000, 5, 9, noise_box=(0, 0, 30, 5)), [(1008, 28), (200, 1)]),
        "noise_64x64": (noise(64, 64, 10), [(64, 64), (64, 32), (96, 64)]),
    }


def write_fuzz(path, count, max_in, max_out, seed):
    rng = np.random.default_rng(seed)
    entries = []
    off = 0
    with open(path, "wb") as f:
        for i in range(count):
            iw, ih = (int(v) for v in rng.integers(1, max_in + 1, size=2))
            ow, oh = (int(v) for v in rng.integers(1, max_out + 1, size=2))
            if i % 7 == 0:
                ow = iw  # horizontal pass skipped
            if i % 11 == 0:
                oh = ih  # vertical pass skipped
            if i % 2 == 0:
                src = noise(iw, ih, seed * 100000 + i)
            else:
                src = pattern(iw, ih, seed * 100000 + i)
            out = src.resize((ow, oh), Image.BICUBIC)
            sb, ob = src.tobytes(), out.tobytes()
            f.write(sb)
            f.write(ob)
            entries.append({"in_w": iw, "in_h": ih, "out_w": ow, "out_h": oh, "src_offset": off,
                            "out_offset": off + len(sb)})
            off += len(sb) + len(ob)
    return entries


# --- smart_resize, verbatim from the two references (for the table) --------------------------

def qvu_smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28):
    """qwen-vl-utils 0.0.8 vision_process.smart_resize (copied; checked against the import)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("ratio")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_table():
    try:
        from qwen_vl_utils.vision_process import smart_resize as qvu
    except Exception as e:  # noqa: BLE001
        print(f"qwen_vl_utils not importable ({e}); using the copied smart_resize", file=sys.stderr)
        qvu = qvu_smart_resize
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf
    except Exception as e:  # noqa: BLE001
        print(f"transformers not importable ({e}); transformers column skipped", file=sys.stderr)
        hf = None

    sizes = [
        (23, 37), (28, 28), (1, 1), (1, 50), (50, 1), (5, 1000), (5, 1001), (5, 1093), (1000, 5),
        (14, 14), (42, 42), (70, 70), (98, 98), (42, 70), (126, 154),  # round half to even
        (480, 640), (476, 644), (700, 1000), (1080, 1920), (2160, 3840), (3000, 4000),
        (97, 301), (301, 97), (224, 224), (56, 56), (55, 57), (100, 20000), (4000, 20),
        (7, 1400), (7, 1401), (16384, 16384), (12345, 6789), (333, 777), (29, 5800),
    ]
    limits = [
        (4 * 28 * 28, 16384 * 28 * 28),  # qwen-vl-utils defaults
        (56 * 56, 28 * 28 * 1280),  # Qwen2VLImageProcessor defaults
        (256 * 28 * 28, 1280 * 28 * 28),  # model card example
        (100, 28 * 28 * 6),  # small budget: floor branch can reach 0
        (28 * 28 * 100, 28 * 28 * 100),
    ]
    rows = []
    for (h, w) in sizes:
        for (mn, mx) in limits:
            row = {"height": h, "width": w, "factor": 28, "min_pixels": mn, "max_pixels": mx}
            try:
                row["qwen_vl_utils"] = list(qvu(h, w, factor=28, min_pixels=mn, max_pixels=mx))
            except ValueError as e:
                row["qwen_vl_utils"] = None
                row["qwen_vl_utils_error"] = str(e)
            assert row["qwen_vl_utils"] is None or tuple(row["qwen_vl_utils"]) == qvu_smart_resize(h, w, 28, mn, mx)
            if hf is not None:
                try:
                    row["transformers"] = list(hf(h, w, factor=28, min_pixels=mn, max_pixels=mx))
                except ValueError as e:
                    row["transformers"] = None
                    row["transformers_error"] = str(e)
            rows.append(row)
    return rows


def preprocess_cases(out_dir):
    try:
        from qwen_vl_utils import fetch_image
        import transformers
        from transformers import Qwen2VLImageProcessor
        import qwen_vl_utils  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"transformers/qwen_vl_utils not importable ({e}); no pixel_values fixtures", file=sys.stderr)
        return None, {}
    versions = {"transformers": transformers.__version__}
    cases = []
    # (name, source image, item options, preprocessor config overrides)
    specs = [
        ("noise_37x23_default", "noise_37x23", {}, {}),
        # qwen-vl-utils resizes 150x120 to 140x112 with its own defaults, then the processor's
        # smart_resize (max_pixels 1568) resizes again to 28x28: two Pillow resizes.
        ("pattern_150x120_two_resizes", None, {}, {"max_pixels": 28 * 28 * 2, "min_pixels": 28 * 28}),
    ]
    srcs = {n: im for n, (im, _) in resize_cases().items()}
    srcs["pattern_150x120"] = pattern(150, 120, 11, noise_box=(50, 40, 90, 80))
    for name, src_name, item, cfg_over in specs:
        if src_name is None:
            src_name = "pattern_150x120"
            srcs[src_name].save(os.path.join(out_dir, f"src_{src_name}.png"))
        img = srcs[src_name]
        cfg = {
            "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
        }
        cfg.update(cfg_over)
        proc = Qwen2VLImageProcessor(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
        fetched = fetch_image({"image": img, **item})
        out = proc(images=[fetched], return_tensors="np")
        pv = np.asarray(out["pixel_values"], dtype=np.float32)
        assert out["pixel_values"].dtype == np.float32, out["pixel_values"].dtype
        grid = [int(v) for v in out["image_grid_thw"][0]]
        fname = f"pv_{name}.f32"
        pv.astype("<f4").tofile(os.path.join(out_dir, fname))
        cases.append({
            "name": name, "src": f"src_{src_name}.png", "item": item, "preprocessor_config": cfg,
            "fetched_hw": [fetched.size[1], fetched.size[0]], "grid_thw": grid,
            "pixel_values": fname, "shape": list(pv.shape),
        })
    return cases, versions


def write_decode_parity(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = pattern(203, 157, 21, noise_box=(20, 20, 80, 80))
    arr = np.asarray(base)
    rgba = Image.fromarray(np.dstack([arr, (np.arange(203)[None, :] + np.zeros((157, 1))).astype(np.uint8)]), "RGBA")
    gray16 = Image.fromarray(arr[..., 0].astype(np.uint16) * 3)  # mode I;16: values up to 765
    files = {
        "rgb.png": (base, {}),
        "rgba.png": (rgba, {}),
        "gray.png": (base.convert("L"), {}),
        "palette.png": (base.convert("P", palette=Image.Palette.ADAPTIVE, colors=37), {}),
        "palette_trns.png": (base.convert("P", palette=Image.Palette.ADAPTIVE, colors=37), {"transparency": 3}),
        "gray16.png": (gray16, {}),
        "q90_420.jpg": (base, {"quality": 90}),
        "q75_444.jpg": (base, {"quality": 75, "subsampling": 0}),
        "q85_422.jpg": (base, {"quality": 85, "subsampling": 1}),
        "progressive.jpg": (base, {"quality": 80, "progressive": True}),
        "gray.jpg": (base.convert("L"), {"quality": 90}),
        "cmyk.jpg": (base.convert("CMYK"), {"quality": 90}),
        "lossy.webp": (base, {"quality": 80}),
        "lossy_alpha.webp": (rgba, {"quality": 80}),
        "lossless.webp": (base, {"lossless": True}),
        "frame.gif": (base, {}),
        "trns.gif": (base.convert("P", palette=Image.Palette.ADAPTIVE, colors=37), {"transparency": 3}),
        "rgb.bmp": (base, {}),
        "rgb.tiff": (base, {}),
        "rgb_lzw.tiff": (base, {"compression": "tiff_lzw"}),
        "gray16.tiff": (gray16, {}),
    }
    entries = []
    for name, (im, kw) in files.items():
        path = os.path.join(out_dir, name)
        im.save(path, **kw)
        with Image.open(path) as f:
            mode = f.mode
            rgb = f.convert("RGB")
        with open(path + ".rgb", "wb") as f:
            f.write(rgb.tobytes())
        entries.append({"file": name, "mode": mode, "w": rgb.size[0], "h": rgb.size[1]})
    with open(os.path.join(out_dir, "decode.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "files": entries}, f, indent=1)
    print(f"wrote {len(entries)} files to {out_dir}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-dir")
    ap.add_argument("--fuzz-dir")
    ap.add_argument("--fuzz-count", type=int, default=2000)
    args = ap.parse_args()
    if PIL.__version__ != "13.0.0":
        sys.exit(f"Pillow {PIL.__version__} found; the fixtures are defined by Pillow 13.0.0")

    if args.decode_dir:
        write_decode_parity(args.decode_dir)
        return

    if args.fuzz_dir:
        os.makedirs(args.fuzz_dir, exist_ok=True)
        entries = write_fuzz(os.path.join(args.fuzz_dir, "fuzz.bin"), args.fuzz_count, 80, 160, 12345)
        with open(os.path.join(args.fuzz_dir, "fuzz.json"), "w") as f:
            json.dump({"pillow": PIL.__version__, "fuzz": entries}, f)
        print(f"wrote {len(entries)} fuzz cases to {args.fuzz_dir}")
        return

    os.makedirs(OUT, exist_ok=True)
    index = {"pillow": PIL.__version__, "numpy": np.__version__, "resize": []}
    for name, (img, targets) in resize_cases().items():
        img.save(os.path.join(OUT, f"src_{name}.png"))
        for (w, h) in targets:
            out = img.resize((w, h), Image.BICUBIC)
            assert out.size == (w, h) and out.mode == "RGB"
            fname = f"out_{name}_{w}x{h}.png"
            out.save(os.path.join(OUT, fname), optimize=True)
            index["resize"].append({
                "src": f"src_{name}.png", "in_w": img.size[0], "in_h": img.size[1],
                "out_w": w, "out_h": h, "out": fname,
                "vertical_first": vertical_first(img.size[0], img.size[1], w, h),
            })
    index["fuzz"] = write_fuzz(os.path.join(OUT, "fuzz.bin"), 30, 24, 48, 7)
    index["smart_resize"] = smart_resize_table()
    pre, versions = preprocess_cases(OUT)
    index.update(versions)
    if pre is not None:
        from importlib.metadata import version

        index["qwen_vl_utils"] = version("qwen-vl-utils")
        index["preprocess"] = pre
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        # One case per line: small, and diffs stay readable.
        f.write("{\n")
        for i, (k, v) in enumerate(index.items()):
            sep = "," if i + 1 < len(index) else ""
            if isinstance(v, list):
                f.write(f" {json.dumps(k)}: [\n")
                f.write(",\n".join("  " + json.dumps(e) for e in v))
                f.write(f"\n ]{sep}\n")
            else:
                f.write(f" {json.dumps(k)}: {json.dumps(v)}{sep}\n")
        f.write("}\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {OUT}: {len(index['resize'])} resize cases, {len(index['fuzz'])} fuzz cases, "
          f"{len(index['smart_resize'])} smart_resize rows, {len(pre or [])} preprocess cases, {total} bytes")


if __name__ == "__main__":
    main()
