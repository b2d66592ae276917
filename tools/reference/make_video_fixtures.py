#!/usr/bin/env python3
"""Writes tests/fixtures/video/: a tiny synthetic video, a 3-frame list of PNGs, and what
qwen-vl-utils 0.0.8 (`fetch_video`, torchvision backend) + transformers 4.49
(`Qwen2VLImageProcessor`, video path) compute for them, plus torch's antialiased bicubic resize
on random images and torch.linspace-rounded frame indices, for the Rust tests in
crates/qwen2vl/src/processing/video/ and crates/qwen2vl/src/ops/resize_torch.rs.

    tools/reference/.venv/bin/python tools/reference/make_video_fixtures.py

qwen-vl-utils' torchvision backend calls `torchvision.io.read_video` (a PyAV wrapper; present in
torchvision 0.21, removed later). It is called unchanged here (FORCE_QWENVL_VIDEO_READER=
torchvision), so the sampling (`smart_nframes`, linspace indices) and the resize
(`transforms.functional.resize(..., BICUBIC, antialias=True)`) are the reference's own code.

Layout (little-endian, row-major):
  clip.mp4              3 s, 10 fps, 160x120, H.264 yuv420p (PyAV/libx264), moving shapes
  frames/f{0,1,2}.png   three frames (odd count: the reference pads by repeating the last)
  cases.json            per case: options, total_frames, video_fps, frame_indices, grid, sizes
  case_<name>.safetensors
      decoded   u8  (T, H0, W0, 3)  sampled frames as read_video gives them (before resizing)
      resized   u8  (T, H, W, 3)    after qwen-vl-utils' resize (what the processor receives)
      pixel_values_videos f32 (n_patches, 1176) (small cases only), pv_row_sums f64 (n_patches,),
      video_grid_thw i64 (1, 3)
  resize_torch.safetensors + resize_torch.json
      src_<k> u8 (h, w, 3), out_<k> u8 (oh, ow, 3), outf_<k> f32 (oh, ow, 3) (before round/cast)
  linspace.json         [[total, n, indices], ...] for torch.linspace(0, total-1, n).round()
  clip.{webm,mkv,avi,mov,gif} + formats.safetensors
                        other containers/codecs (80x60, 20 frames): read_video's sampled frames
                        for nframes=4 (cases.json["formats"])
"""

import json
import os
import sys

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchvision")

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "video")
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen2vl")

W, H, FPS, SECONDS = 160, 120, 10, 3


def synth_frame(i, w=W, h=H):
    """Smooth gradient background + a moving disc + a moving bar + fine stripes."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    t = i / FPS
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 128 + 100 * np.sin(x / 17.0 + t)
    img[..., 1] = 128 + 100 * np.cos(y / 13.0 - 2 * t)
    img[..., 2] = 255 * (x + y) / (w + h)
    cx, cy = 20 + 40 * t, 30 + 20 * np.sin(3 * t)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < 18**2
    img[disc] = [250, 30, 40]
    bar = (np.abs(y - (h - 25 - 25 * t)) < 6) & (x > 30) & (x < 130)
    img[bar] = [20, 40, 230]
    stripes = (x > w - 30) & ((x // 2 + i) % 2 == 0)
    img[stripes] = [255, 255, 255]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_clip(path):
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "28", "preset": "medium", "bframes": "2", "threads": "1"}
        for i in range(FPS * SECONDS):
            f = av.VideoFrame.from_ndarray(synth_frame(i), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_small(path, codec, pix):
    """80x60, 2 s at 10 fps, through PyAV's encoder `codec`."""
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = 80, 60, pix
        if codec == "libvpx":
            s.options = {"threads": "1", "crf": "20", "b": "200k"}
        for i in range(2 * FPS):
            img = np.ascontiguousarray(synth_frame(i)[::2, ::2])
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_resize_torch(out_dir, n_random, seed, max_in=90, max_out=120, fixed=True):
    """torch's antialiased bicubic resize (torchvision F.resize on uint8 → float32 kernel):
    resize_torch.safetensors + resize_torch.json in out_dir."""
    rng = np.random.default_rng(seed)
    sizes = [] if not fixed else [((120, 160), (280, 392)), ((120, 160), (84, 112)), ((50, 37), (23, 61)),
             ((64, 64), (64, 28)), ((31, 45), (31, 90)), ((200, 150), (56, 56)),
             ((17, 300), (28, 560)), ((1, 9), (5, 3)), ((90, 90), (30, 30)),
             ((45, 80), (112, 196)), ((100, 7), (33, 7))]
    for _ in range(n_random):
        ih, iw = rng.integers(1, max_in, size=2)
        oh, ow = rng.integers(1, max_out, size=2)
        sizes.append(((int(ih), int(iw)), (int(oh), int(ow))))
    rt, meta = {}, []
    for k, ((ih, iw), (oh, ow)) in enumerate(sizes):
        if k % 3 == 0:
            src = rng.integers(0, 256, size=(ih, iw, 3), dtype=np.uint8)
        else:  # smooth + edges: overshoot and clipping
            yy, xx = np.mgrid[0:ih, 0:iw]
            src = np.stack([(xx * 255 // max(iw - 1, 1)), (yy * 255 // max(ih - 1, 1)),
                            ((xx // 3 + yy // 2) % 2) * 255], -1).astype(np.uint8)
        t = torch.from_numpy(src).permute(2, 0, 1)[None]
        out = transforms.functional.resize(t, [oh, ow], interpolation=InterpolationMode.BICUBIC,
                                           antialias=True)
        outf = torch.nn.functional.interpolate(t.float(), size=[oh, ow], mode="bicubic",
                                               align_corners=False, antialias=True)
        rt[f"src_{k}"] = src
        rt[f"out_{k}"] = out[0].permute(1, 2, 0).contiguous().numpy()
        rt[f"outf_{k}"] = outf[0].permute(1, 2, 0).contiguous().numpy()
        meta.append({"k": k, "in_hw": [ih, iw], "out_hw": [oh, ow]})
    save_file(rt, os.path.join(out_dir, "resize_torch.safetensors"), metadata={"what": "resize_torch"})
    with open(os.path.join(out_dir, "resize_torch.json"), "w") as f:
        json.dump(meta, f)



def read_video_frames(ele):
    """What qwen-vl-utils' _read_video_torchvision sampled (before resizing), and its numbers."""
    from torchvision import io

    video, _, info = io.read_video(
        ele["video"], start_pts=ele.get("video_start", 0.0), end_pts=ele.get("video_end", None),
        pts_unit="sec", output_format="TCHW")
    total, vfps = video.size(0), info["video_fps"]
    from qwen_vl_utils.vision_process import smart_nframes

    n = smart_nframes(ele, total_frames=total, video_fps=vfps)
    idx = torch.linspace(0, total - 1, n).round().long()
    return video[idx], idx.tolist(), total, vfps


def main():
    import transformers
    import qwen_vl_utils
    from qwen_vl_utils.vision_process import fetch_video
    from transformers import AutoProcessor

    os.makedirs(os.path.join(OUT, "frames"), exist_ok=True)
    clip = os.path.join(OUT, "clip.mp4")
    write_clip(clip)
    frame_paths = []
    for k, i in enumerate([0, 7, 19]):
        p = os.path.join(OUT, "frames", f"f{k}.png")
        Image.fromarray(synth_frame(i)[10:110, 5:150]).save(p)
        frame_paths.append(p)

    proc = AutoProcessor.from_pretrained(MODEL)
    ip = proc.image_processor
    cases = [
        ("fps2", {"video": clip}),
        ("nframes4", {"video": clip, "nframes": 4}),
        ("fps1_clip", {"video": clip, "fps": 1.0, "video_start": 0.75, "video_end": 2.5}),
        ("nframes6_small", {"video": clip, "nframes": 6, "max_pixels": 20000, "min_pixels": 3136}),
        ("fps3_maxframes", {"video": clip, "fps": 3.0, "max_frames": 5}),
        ("frame_list", {"video": frame_paths}),
    ]
    summary = {"versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                            "av": av.__version__, "qwen_vl_utils": "0.0.8",
                            "pillow": Image.__version__},
               "clip": {"file": "clip.mp4", "width": W, "height": H, "fps": FPS,
                        "frames": FPS * SECONDS, "bytes": os.path.getsize(clip)},
               "cases": []}
    for name, ele in cases:
        out = fetch_video(dict(ele))
        entry = {"name": name,
                 "options": {k: (os.path.relpath(v, OUT) if k == "video" and isinstance(v, str)
                                 else [os.path.relpath(x, OUT) for x in v] if k == "video"
                                 else v) for k, v in ele.items()}}
        tensors = {}
        if isinstance(ele["video"], str):
            decoded, idx, total, vfps = read_video_frames(dict(ele))
            entry.update(frame_indices=idx, total_frames=total, video_fps=vfps,
                         sample_fps=len(idx) / max(total, 1e-6) * vfps)
            tensors["decoded"] = decoded.permute(0, 2, 3, 1).contiguous().numpy()
            # fetch_video returns float with integral values (uint8 resize then .float()).
            assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
            tensors["resized"] = out.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            video_in = out
        else:
            entry.update(frame_indices=list(range(len(out))), total_frames=len(ele["video"]))
            tensors["resized"] = np.stack([np.asarray(im) for im in out])
            video_in = out
        r = ip(images=None, videos=[video_in], return_tensors="np")
        pv = r["pixel_values_videos"].astype(np.float32)
        # Full pixel values only for the small cases (the file size); for the others the
        # per-row sums (in float64) — the resized frames are compared bit for bit anyway.
        if pv.size <= 400_000:
            tensors["pixel_values_videos"] = pv
        tensors["pv_row_sums"] = pv.astype(np.float64).sum(axis=1)
        entry["n_patches"] = int(pv.shape[0])
        tensors["video_grid_thw"] = r["video_grid_thw"].astype(np.int64)
        entry["grid_thw"] = r["video_grid_thw"][0].tolist()
        entry["resized_hw"] = list(tensors["resized"].shape[1:3])
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  os.path.join(OUT, f"case_{name}.safetensors"), metadata={"case": name})
        summary["cases"].append(entry)
        print(name, entry["grid_thw"], entry.get("frame_indices"), file=sys.stderr)

    write_resize_torch(OUT, 10, 1234)

    lin = []
    for total in list(range(1, 70)) + [97, 101, 255, 300, 601, 999, 1200, 1799, 3001, 14399, 36000,
                                        54321, 100000]:
        for n in sorted({2, 4, 6, 8, 10, 12, 14, 16, 18, 22, 26, 30, 32, 34, 46, 50, 62, 64, 98,
                         100, 126, 128, 200, 256, 334, 400, 500, 766, 768}
                        | ({total} if total < 70 else set())):
            if 1 <= n <= total:
                idx = torch.linspace(0, total - 1, n).round().long().tolist()
                lin.append([total, n, idx])
    with open(os.path.join(OUT, "linspace.json"), "w") as f:
        json.dump(lin, f, separators=(",", ":"))
    # Other containers/codecs (80x60, 2 s at 10 fps; nframes 4): what read_video decodes.
    summary["formats"] = []
    fmt_tensors = {}
    for fname, codec, pix in [("clip.webm", "libvpx", "yuv420p"), ("clip.mkv", "mpeg4", "yuv420p"),
                              ("clip.avi", "mpeg4", "yuv420p"), ("clip.mov", "mpeg4", "yuv420p"),
                              ("clip.gif", "gif", None)]:
        path = os.path.join(OUT, fname)
        if codec == "gif":  # animated GIF written by Pillow (100 ms per frame)
            ims = [Image.fromarray(np.ascontiguousarray(synth_frame(i)[::2, ::2]))
                   for i in range(2 * FPS)]
            ims[0].save(path, save_all=True, append_images=ims[1:], duration=100, loop=0)
        else:
            write_small(path, codec, pix)
        ele = {"video": path, "nframes": 4}
        try:
            decoded, idx, total, vfps = read_video_frames(dict(ele))
        except Exception as e:  # noqa: BLE001
            print(fname, "reference cannot read it:", e, file=sys.stderr)
            os.remove(path)
            continue
        key = fname.replace(".", "_")
        fmt_tensors[key] = decoded.permute(0, 2, 3, 1).contiguous().numpy()
        summary["formats"].append({"file": fname, "codec": codec, "nframes": 4,
                                   "frame_indices": idx, "total_frames": total,
                                   "video_fps": vfps, "bytes": os.path.getsize(path)})
        print(fname, total, vfps, idx, file=sys.stderr)
    save_file(fmt_tensors, os.path.join(OUT, "formats.safetensors"), metadata={"what": "formats"})
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--resize-fuzz-dir":
        # Many random resizes (not committed) for the ignored Rust test resize_torch_fuzz_external
        # (env QWEN2VL_RESIZE_TORCH_FUZZ=DIR).
        os.makedirs(sys.argv[2], exist_ok=True)
        write_resize_torch(sys.argv[2], 600, 99, max_in=70, max_out=90, fixed=False)
    else:
        main()
