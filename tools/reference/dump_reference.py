#!/usr/bin/env python3
"""Record what the reference (transformers 4.49.0 + qwen-vl-utils 0.0.8 + Pillow 13.0, float32,
eager attention) computes for the fixture cases.

Writes
  tests/fixtures/images/*.png                deterministic test images (--images-only to stop here)
  tests/fixtures/cases/<name>/case.json      inputs (model dir, messages, max_new_tokens, prompt)
  tests/fixtures/cases/<name>/reference.safetensors
  tests/fixtures/cases/summary.json          per case: shapes, greedy margins, f32-vs-f64 error

Pipeline (the reference's):
  text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  image_inputs, video_inputs = qwen_vl_utils.process_vision_info(messages)
  inputs = processor(text=[text], images=image_inputs, videos=video_inputs, return_tensors="pt")
  position_ids, rope_delta = model.get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)

Qwen2.5-VL cases (model tiny-qwen25vl, from make_qwen25vl.py) give the processor each video's
sampling rate, as later qwen-vl-utils' process_vision_info(..., return_video_kwargs=True) does
({"fps": [nframes / total_frames * video_fps]}; a frame list: its "fps", default 2.0): 0.0.8
returns none, and without it the processor assumes 2 fps whatever the sampling. The
processor's second_per_grid_ts (temporal_patch_size / fps) is recorded.
  vision_embeds = model.visual(pixel_values, grid_thw=image_grid_thw)
  logits / hidden states: model(**inputs, output_hidden_states=True)
  greedy_ids: model.generate(**inputs, do_sample=False, max_new_tokens=N) (explicit GenerationConfig)

Usage: python tools/reference/dump_reference.py [--case NAME ...] [--no-f64]
"""
import argparse
import base64
import contextlib
import copy
import io
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_tiny_model import load_reference_model  # noqa: E402
from make_qwen25vl import load_reference_model as load_qwen25vl  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
IMAGES = os.path.join(FIXTURES, "images")
CASES_DIR = os.path.join(FIXTURES, "cases")

EOS_IDS = [151645, 151643]
PAD_ID = 151643

# name -> (width, height, seed)
IMAGE_SPECS = {
    "small.png": (30, 20, 101),
    "photo640.png": (640, 480, 102),
    "wide.png": (300, 200, 103),
    "tall.png": (150, 260, 104),
}

# Images in other formats and modes (issue 3): name -> (width, height, seed, how it is saved).
EXTRA_IMAGE_SPECS = {
    "tiny20.png": (20, 20, 105, "png"),
    "strip1000x5.png": (1000, 5, 106, "png"),  # aspect ratio exactly 200: accepted
    "cmyk.jpg": (120, 90, 107, "cmyk_jpeg"),  # CMYK with a non-zero K plate, Adobe marker
    "palette.png": (100, 80, 108, "palette_png"),
    "rgba.png": (90, 70, 109, "rgba_png"),
    "gray.png": (80, 100, 110, "gray_png"),
    "anim.gif": (64, 48, 111, "gif2"),  # two frames; the first is used
    "photo.jpg": (200, 150, 112, "progressive_jpeg"),  # progressive 4:2:0, quality 85
    "lossy.webp": (96, 72, 113, "webp"),  # lossy VP8, quality 80
    "plain.bmp": (70, 90, 114, "bmp"),  # 24-bit BMP (bottom-up rows)
    "lzw.tiff": (110, 60, 115, "tiff_lzw"),  # RGB TIFF, LZW compressed
    "gray16.png": (60, 60, 116, "gray16_png"),  # mode I;16, values up to 765 (clipped by convert)
}


def img(name):
    return {"type": "image", "image": f"../../images/{name}"}


def txt(t):
    return {"type": "text", "text": t}


CASES = {
    "text_only": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [txt("Write a haiku about Rust.")]}],
    ),
    "small_image": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("small.png"), txt("What is in this small picture?")]}],
    ),
    "image_640": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("photo640.png"), txt("Describe this image.")]}],
    ),
    "two_images": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("wide.png"), img("tall.png"),
                                               txt("Compare these two images. Which one is taller?")]}],
    ),
    "second_turn": dict(
        model="tiny-qwen2vl",
        messages=[
            {"role": "user", "content": [img("wide.png"), txt("What shape is in the middle of this image?")]},
            {"role": "assistant", "content": "It is a circle, partly covered by a rectangle."},
            {"role": "user", "content": "And what colour is it?"},
        ],
    ),
    "image_video": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [
            img("wide.png"),
            {"type": "video", "video": "../../video/clip.mp4", "fps": 2.0},
            txt("What moves in the video, and what is in the picture?")]}],
    ),
    "untied_image": dict(
        model="tiny-qwen2vl-untied",
        messages=[{"role": "user", "content": [img("wide.png"), txt("Describe this image.")]}],
    ),
    # issue 3: every image form and mode
    "image_20x20": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("tiny20.png"), txt("What is this?")]}],
    ),
    "image_1000x5": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("strip1000x5.png"), txt("Read this strip.")]}],
    ),
    "cmyk_jpeg": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("cmyk.jpg"), txt("Describe the colours.")]}],
    ),
    "palette_png": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("palette.png"), txt("Describe this image.")]}],
    ),
    "rgba_png": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("rgba.png"), txt("Describe this image.")]}],
    ),
    "gray_png": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("gray.png"), txt("Is this black and white?")]}],
    ),
    "gif": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [img("anim.gif"), txt("What is in this GIF?")]}],
    ),
    "three_images_two_turns": dict(
        model="tiny-qwen2vl",
        messages=[
            {"role": "user", "content": [img("wide.png"), img("photo.jpg"), txt("What do these two have in common?")]},
            {"role": "assistant", "content": "Both show a circle and a rectangle."},
            {"role": "user", "content": [txt("And this one?"), img("tall.png")]},
        ],
    ),
    "more_formats": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [
            img("lossy.webp"), img("plain.bmp"), img("lzw.tiff"), img("gray16.png"),
            txt("Compare these four pictures.")]}],
    ),
    "data_uri": dict(
        model="tiny-qwen2vl",
        messages=[{"role": "user", "content": [
            {"type": "image", "image": "data:image/png;base64,<small.png>"},
            txt("What is in this small picture?")]}],
    ),
    # Qwen2.5-VL (issue 15): merged grids that the 4x4 windows do not divide (17x23; 7x11
    # and 9x5; 10x14 video frames), videos at two sampling rates (2 fps: 1 s a temporal
    # patch; 3 fps on a 10 fps clip samples 8 of 30 frames, 2.67 fps: 0.75 s, so
    # 0.75 * 2 tokens/s gives temporal ids 0, 1, 3, 4, truncated).
    "qwen25_image": dict(
        model="tiny-qwen25vl",
        messages=[{"role": "user", "content": [img("photo640.png"), txt("Describe this image.")]}],
    ),
    "qwen25_two_images": dict(
        model="tiny-qwen25vl",
        messages=[{"role": "user", "content": [img("wide.png"), img("tall.png"),
                                               txt("Compare these two images. Which one is taller?")]}],
    ),
    "qwen25_video_fps2": dict(
        model="tiny-qwen25vl",
        messages=[{"role": "user", "content": [
            {"type": "video", "video": "../../video/clip.mp4", "fps": 2.0},
            txt("What moves in the video?")]}],
    ),
    "qwen25_image_video_fps3": dict(
        model="tiny-qwen25vl",
        messages=[{"role": "user", "content": [
            img("wide.png"),
            {"type": "video", "video": "../../video/clip.mp4", "fps": 3.0},
            txt("What moves in the video, and what is in the picture?")]}],
    ),
}


# ----------------------------------------------------------------------------- images

def make_image(w, h, seed):
    """Smooth colour gradients + a few hard-edged shapes + thin lines + seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    img = np.zeros((h, w, 3), np.float64)
    for c in range(3):
        a, b = rng.uniform(-1.5, 1.5, 2)
        ph = rng.uniform(0, 2 * math.pi)
        img[..., c] = 128 + 100 * np.sin(2 * math.pi * (a * u + b * v) + ph)
    # filled circle
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    r = rng.uniform(0.15, 0.3) * min(w, h)
    m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    img[m] = rng.uniform(0, 255, 3)
    # rectangle
    x0, y0 = int(rng.uniform(0.05, 0.5) * w), int(rng.uniform(0.05, 0.5) * h)
    x1, y1 = x0 + max(2, int(rng.uniform(0.2, 0.45) * w)), y0 + max(2, int(rng.uniform(0.2, 0.45) * h))
    img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    # thin diagonal lines and a checker patch (high frequencies for the resampler)
    d = (x + 2 * y) % max(7, min(w, h) // 6)
    img[d < 1] = [250, 250, 250]
    cs = max(2, min(w, h) // 20)
    pm = (x < w * 0.25) & (y > h * 0.75)
    chk = ((x // cs + y // cs) % 2 == 0) & pm
    img[chk] = [10, 10, 10]
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def write_images():
    os.makedirs(IMAGES, exist_ok=True)
    for name, (w, h, seed) in IMAGE_SPECS.items():
        im = make_image(w, h, seed)
        path = os.path.join(IMAGES, name)
        im.save(path, format="PNG", optimize=False, compress_level=9)
        with Image.open(path) as chk:
            assert chk.mode == "RGB" and chk.size == (w, h)
            assert np.array_equal(np.asarray(chk), np.asarray(im))
    print(f"images: {', '.join(IMAGE_SPECS)} -> {IMAGES}")
    write_extra_images()


def write_extra_images():
    for name, (w, h, seed, how) in EXTRA_IMAGE_SPECS.items():
        im = make_image(w, h, seed)
        path = os.path.join(IMAGES, name)
        if how == "png":
            im.save(path, format="PNG", optimize=False, compress_level=9)
        elif how == "cmyk_jpeg":
            c, m, y, _ = im.convert("CMYK").split()
            k = Image.fromarray((np.asarray(im.convert("L")).astype(np.int32) * 0 +
                                 np.linspace(0, 180, w)[None, :].astype(np.int32)).astype(np.uint8), "L")
            Image.merge("CMYK", (c, m, y, k)).save(path, format="JPEG", quality=90)
        elif how == "palette_png":
            im.convert("P", palette=Image.Palette.ADAPTIVE, colors=37).save(path, format="PNG", compress_level=9)
        elif how == "rgba_png":
            a = np.asarray(im.convert("L"))[..., None] // 2 + 64
            Image.fromarray(np.concatenate([np.asarray(im), a], axis=2), "RGBA").save(
                path, format="PNG", compress_level=9)
        elif how == "gray_png":
            im.convert("L").save(path, format="PNG", compress_level=9)
        elif how == "gif2":
            im2 = make_image(w, h, seed + 1000)
            im.save(path, format="GIF", save_all=True, append_images=[im2], duration=100, loop=0)
        elif how == "progressive_jpeg":
            im.save(path, format="JPEG", quality=85, progressive=True)
        elif how == "webp":
            im.save(path, format="WEBP", quality=80)
        elif how == "bmp":
            im.save(path, format="BMP")
        elif how == "tiff_lzw":
            im.save(path, format="TIFF", compression="tiff_lzw")
        elif how == "gray16_png":
            Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 3).save(path, format="PNG")
        else:
            raise ValueError(how)
    print(f"images: {', '.join(EXTRA_IMAGE_SPECS)} -> {IMAGES}")


def data_uri(name):
    with open(os.path.join(IMAGES, name), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def resolve_data_uris(messages):
    """`data:image/png;base64,<name>` placeholders -> the file's bytes, base64."""
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m["content"], list):
            for part in m["content"]:
                v = part.get("image")
                if isinstance(v, str) and v.startswith("data:") and v.endswith(">"):
                    part["image"] = data_uri(v[v.index("<") + 1:-1])
    return out


def open_original(case_dir, src):
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split("base64,", 1)[1])))
    return Image.open(os.path.normpath(os.path.join(case_dir, src)))


# ----------------------------------------------------------------------------- cases

def absolutize(messages, case_dir):
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m["content"], list):
            for part in m["content"]:
                for key in ("image", "video"):
                    if key in part and isinstance(part[key], str) and not part[key].startswith(("http", "file:", "data:")):
                        part[key] = os.path.normpath(os.path.join(case_dir, part[key]))
    return out


class Runner:
    def __init__(self, model_dir, f64=True):
        from transformers import AutoProcessor

        self.model_dir = model_dir
        with open(os.path.join(model_dir, "config.json")) as f:
            self.qwen25 = json.load(f)["architectures"][0] == "Qwen2_5_VLForConditionalGeneration"
        load = load_qwen25vl if self.qwen25 else load_reference_model
        self.processor = AutoProcessor.from_pretrained(model_dir)
        want = "Qwen2_5_VLProcessor" if self.qwen25 else "Qwen2VLProcessor"
        assert type(self.processor).__name__ == want, type(self.processor).__name__
        assert type(self.processor.image_processor).__name__ == "Qwen2VLImageProcessor"
        self.model = load(model_dir, torch.float32, "eager")
        self.model64 = load(model_dir, torch.float64, "eager") if f64 else None


def video_sample_fps(ele):
    """The rate of the frames qwen-vl-utils samples from a video item (what its later versions
    return in video_kwargs): nframes / total_frames * video_fps, read with the torchvision
    backend as 0.0.8 does; a frame list: the item's fps (default 2.0)."""
    from qwen_vl_utils import vision_process as vp
    from torchvision import io as tvio

    if not isinstance(ele["video"], str):
        return float(ele.get("fps", vp.FPS))
    assert vp.get_video_reader_backend() == "torchvision"
    video, _, info = tvio.read_video(ele["video"], start_pts=ele.get("video_start", 0.0),
                                     end_pts=ele.get("video_end", None), pts_unit="sec",
                                     output_format="TCHW")
    total, video_fps = video.size(0), info["video_fps"]
    nframes = vp.smart_nframes(ele, total_frames=total, video_fps=video_fps)
    return nframes / max(total, 1e-6) * video_fps


class Float64Math:
    """While active, transformers 4.49's Qwen2.5-VL computes in float64 where its float64 run
    would drop to float32: the vision tower's rotary step (`apply_rotary_pos_emb_vision`
    casts q and k with `.float()`) and the eager softmaxes (`dtype=torch.float32`). Used for
    the Qwen2.5-VL cases' float64 noise floor only: with those steps in float32 the "f64" run
    is itself 1.3e-4 away from float64 on qwen25_image (measured), a case whose logits move
    ten times more with rounding than the Qwen2-VL cases'."""

    def __enter__(self):
        import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as m

        self.m, self.rot, self.softmax = m, m.apply_rotary_pos_emb_vision, torch.nn.functional.softmax
        softmax = self.softmax

        def rot(q, k, cos, sin):
            if q.dtype != torch.float64:
                return self.rot(q, k, cos, sin)
            cos, sin = cos.unsqueeze(-2).double(), sin.unsqueeze(-2).double()
            return (q * cos) + (m.rotate_half(q) * sin), (k * cos) + (m.rotate_half(k) * sin)

        def sm(x, dim=None, dtype=None, **kw):
            return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype, **kw)

        m.apply_rotary_pos_emb_vision = rot
        torch.nn.functional.softmax = sm
        return self

    def __exit__(self, *exc):
        self.m.apply_rotary_pos_emb_vision = self.rot
        torch.nn.functional.softmax = self.softmax


def greedy(model, inputs, max_new_tokens):
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
        eos_token_id=EOS_IDS, pad_token_id=PAD_ID, bos_token_id=151643,
        output_logits=True, return_dict_in_generate=True,
        temperature=None, top_k=None, top_p=None,
    )
    model.rope_deltas = None
    out = model.generate(**inputs, generation_config=gc)
    seq_len = inputs["input_ids"].shape[1]
    new = out.sequences[0, seq_len:]
    step_logits = torch.stack([l[0] for l in out.logits])  # [k, vocab]
    return new, step_logits


def top2_gap(logits):
    t = torch.topk(logits.double(), 2, dim=-1).values
    return (t[..., 0] - t[..., 1])


def f64_noise_floor(info, t, runner, inputs, grid, image_inputs, new_ids, max_new_tokens):
    """The case computed in float64: how far float32 is from it (summary.json)."""
    m64, logits = runner.model64, t["logits"]
    # second_per_grid_ts (a list) stays as it is: it sets position ids, not activations.
    inputs64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in inputs.items()}
    m64.rope_deltas = None
    o64 = m64(**inputs64, output_hidden_states=True, use_cache=False)
    info["f32_vs_f64_logits_max_abs"] = float((o64.logits[0, -1] - logits.double()).abs().max())
    info["f32_vs_f64_layer0_max_abs"] = float((o64.hidden_states[1][0] - t["layer0_out"].double()).abs().max())
    info["f32_vs_f64_final_hidden_max_abs"] = float(
        (o64.hidden_states[-1][0, -1] - t["final_hidden"].double()).abs().max())
    if image_inputs:
        ve64 = m64.visual(inputs64["pixel_values"], grid_thw=grid)
        info["f32_vs_f64_vision_max_abs"] = float((ve64 - t["vision_embeds"].double()).abs().max())
    new64, _ = greedy(m64, inputs64, max_new_tokens)
    info["f64_greedy_same"] = bool(torch.equal(new64, new_ids))


@torch.no_grad()
def run_case(name, spec, runner, max_new_tokens=32):
    case_dir = os.path.join(CASES_DIR, name)
    os.makedirs(case_dir, exist_ok=True)
    from qwen_vl_utils import process_vision_info

    proc, model = runner.processor, runner.model
    messages = resolve_data_uris(spec["messages"])
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    msgs_abs = absolutize(messages, case_dir)
    image_inputs, video_inputs = process_vision_info(msgs_abs)
    video_kwargs = {}
    if runner.qwen25 and video_inputs:
        from qwen_vl_utils.vision_process import extract_vision_info

        video_kwargs["fps"] = [video_sample_fps(e) for e in extract_vision_info(msgs_abs) if "video" in e]
    inputs = proc(text=[text], images=image_inputs, videos=video_inputs, return_tensors="pt", **video_kwargs)
    input_ids = inputs["input_ids"]
    attn = inputs["attention_mask"]
    assert attn.all()
    grid = inputs.get("image_grid_thw")
    t = {"input_ids": input_ids[0].to(torch.int64)}
    info = {"seq_len": int(input_ids.shape[1])}

    if image_inputs:
        pv = inputs["pixel_values"]
        assert pv.dtype == torch.float32
        t["pixel_values"] = pv
        t["image_grid_thw"] = grid.to(torch.int64)
        hw = torch.tensor([[im.size[1], im.size[0]] for im in image_inputs], dtype=torch.int64)
        t["resized_hw"] = hw
        assert torch.equal(hw, grid[:, 1:] * 14), (hw, grid)
        # Would the processor alone (on the original images) resize to the same size / pixels?
        originals = [open_original(case_dir, p["image"]).convert("RGB")
                     for m in messages if isinstance(m["content"], list) for p in m["content"] if "image" in p]
        try:
            alone = proc.image_processor(images=originals, return_tensors="pt")
            info["processor_alone_same_grid"] = bool(torch.equal(alone["image_grid_thw"], grid))
            info["processor_alone_max_abs_pixel_diff"] = (
                float((alone["pixel_values"] - pv).abs().max()) if info["processor_alone_same_grid"] else None)
        except ValueError as e:  # e.g. transformers' smart_resize refuses sides < 28; qwen-vl-utils' does not
            info["processor_alone_error"] = str(e)
        info["image_sizes_wh"] = [list(im.size) for im in originals]
        info["resized_hw"] = hw.tolist()
        info["image_grid_thw"] = grid.tolist()
        n_img_tokens = int((input_ids == model.config.image_token_id).sum())
        assert n_img_tokens == int(grid.prod(-1).sum()) // 4

    vgrid = inputs.get("video_grid_thw")
    if video_inputs:
        pvv = inputs["pixel_values_videos"]
        assert pvv.dtype == torch.float32
        t["pixel_values_videos"] = pvv
        t["video_grid_thw"] = vgrid.to(torch.int64)
        info["video_grid_thw"] = vgrid.tolist()
        if runner.qwen25:
            # A list of Python floats (temporal_patch_size / fps) even with return_tensors="pt";
            # get_rope_index multiplies an int64 range by one, in float32 (the default dtype).
            spg = inputs["second_per_grid_ts"]
            spg = spg.tolist() if torch.is_tensor(spg) else list(spg)
            t["second_per_grid_ts"] = torch.tensor(spg, dtype=torch.float32)
            info["video_sample_fps"] = video_kwargs["fps"]
            info["second_per_grid_ts"] = spg
        n_vid_tokens = int((input_ids == model.config.video_token_id).sum())
        assert n_vid_tokens == int(vgrid.prod(-1).sum()) // 4

    rope_kwargs = {"second_per_grid_ts": inputs.get("second_per_grid_ts")} if runner.qwen25 else {}
    position_ids, rope_delta = model.get_rope_index(input_ids, grid, vgrid, attention_mask=attn, **rope_kwargs)
    t["position_ids"] = position_ids[:, 0, :].to(torch.int64)
    t["rope_delta"] = rope_delta.reshape(1).to(torch.int64)
    info["rope_delta"] = int(rope_delta.reshape(-1)[0])

    if image_inputs:
        ve = model.visual(inputs["pixel_values"], grid_thw=grid)
        t["vision_embeds"] = ve
    if video_inputs:
        t["video_embeds"] = model.visual(inputs["pixel_values_videos"], grid_thw=vgrid)

    model.rope_deltas = None
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    logits = out.logits[0, -1]
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    t["layer0_out"] = hs[1][0]
    t["final_hidden"] = hs[-1][0, -1]
    t["logits"] = logits
    # the last hidden state is the normed one: lm_head(final_hidden) == logits
    assert torch.allclose(model.lm_head(t["final_hidden"]), logits, atol=1e-4, rtol=1e-5)

    new_ids, step_logits = greedy(model, inputs, max_new_tokens)
    t["greedy_ids"] = new_ids.to(torch.int64)
    gaps = top2_gap(step_logits)
    info["greedy_len"] = int(new_ids.numel())
    info["greedy_stopped_on_eos"] = bool(new_ids.numel() < max_new_tokens)
    info["min_greedy_margin"] = float(gaps.min())
    info["prefill_margin"] = float(top2_gap(logits))
    info["prefill_vs_generate_step0_max_abs"] = float((step_logits[0] - logits).abs().max())
    assert torch.equal(step_logits.argmax(-1), new_ids)
    info["logits_std"] = float(logits.std())
    info["distinct_greedy_tokens"] = len(set(new_ids.tolist()))

    # Sensitivity: would plain 1-D positions change the result? (M-RoPE must matter)
    if image_inputs or video_inputs:
        seq = input_ids.shape[1]
        pos1d = torch.arange(seq).view(1, 1, -1).expand(3, 1, -1)
        model.rope_deltas = None
        l1d = model(**inputs, position_ids=pos1d, use_cache=False).logits[0, -1]
        info["logits_change_if_1d_positions"] = float((l1d - logits).abs().max())

    # f32 noise floor: the same computation in float64
    if runner.model64 is not None:
        with Float64Math() if runner.qwen25 else contextlib.nullcontext():
            f64_noise_floor(info, t, runner, inputs, grid, image_inputs, new_ids, max_new_tokens)
        if runner.qwen25:
            info["f64_run"] = "vision rotary and softmaxes in float64 (Float64Math)"

    for k, v in t.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), (name, k)
            t[k] = v.detach().to(torch.float32).contiguous()
        else:
            t[k] = v.detach().contiguous()

    from safetensors.torch import save_file

    # one metadata key only: safetensors writes its metadata map in random order
    save_file(t, os.path.join(case_dir, "reference.safetensors"), metadata={
        "generator": "tools/reference/dump_reference.py (transformers %s, torch %s, eager, float32)"
        % (__import__("transformers").__version__, torch.__version__)})
    case = {
        "model": f"../../{spec['model']}",
        "messages": messages,
        "max_new_tokens": max_new_tokens,
        "add_generation_prompt": True,
        "prompt": text,
    }
    with open(os.path.join(case_dir, "case.json"), "w", encoding="utf-8") as f:
        json.dump(case, f, ensure_ascii=False, indent=2)
        f.write("\n")
    info["tensors"] = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in t.items()}
    info["absmax"] = {k: float(v.abs().max()) for k, v in t.items() if v.is_floating_point()}
    info["greedy_ids"] = new_ids.tolist()
    info["greedy_text"] = proc.tokenizer.decode(new_ids)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="only these cases (default: all)")
    ap.add_argument("--images-only", action="store_true")
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 noise-floor comparison")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import PIL
    import transformers
    import qwen_vl_utils  # noqa: F401

    assert transformers.__version__ == "4.49.0", transformers.__version__
    assert PIL.__version__.startswith("13.0"), PIL.__version__
    write_images()
    if args.images_only:
        return
    names = args.case or list(CASES)
    runners = {}
    summary_path = os.path.join(CASES_DIR, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f).get("cases", {})
    for name in names:
        spec = CASES[name]
        mdir = os.path.join(FIXTURES, spec["model"])
        if mdir not in runners:
            runners[mdir] = Runner(mdir, f64=not args.no_f64)
        info = run_case(name, spec, runners[mdir])
        summary[name] = info
        tens = ", ".join(f"{k} {d}{s}" for k, (d, s) in info["tensors"].items())
        print(f"[{name}] seq {info['seq_len']}  greedy {info['greedy_len']} tokens "
              f"({info['distinct_greedy_tokens']} distinct)  min margin {info['min_greedy_margin']:.4f}")
        print(f"    {tens}")
        extra = {k: v for k, v in info.items() if k.startswith(("f32_vs", "f64", "logits_change", "processor_alone"))}
        print(f"    {extra}")
    summary = {k: summary[k] for k in CASES if k in summary}
    import PIL as _pil
    import qwen_vl_utils as _q

    out = {
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "pillow": _pil.__version__,
            "qwen_vl_utils": "0.0.8",
            "numpy": np.__version__,
        },
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "min_greedy_margin": min(v["min_greedy_margin"] for v in summary.values()),
        "cases": summary,
    }
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"min greedy top1-top2 margin over all cases: {out['min_greedy_margin']:.5f}")


if __name__ == "__main__":
    main()
