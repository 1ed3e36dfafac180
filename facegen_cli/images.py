"""Pixels: conversions between PIL images, uint8 arrays and the networks' tensors, grids, and reading
photos as they are (mode, EXIF orientation, the options that write them back the same way).

Arrays are uint8 (B, H, W, 3); tensors are float (B, 3, H, W) in [-1, 1].
"""

import json
import re
import struct
import xml.sax.saxutils
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, JpegImagePlugin, UnidentifiedImageError

from .errors import FacegenError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# What PIL raises for a file that is not a readable image.
UNREADABLE_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def deep_grey_scale(image):
    """How many of a 16- or 32-bit grey image's levels make one 8-bit level: 257 for 16-bit data, 1 for an
    "I" image that holds only 8-bit values."""
    return 257 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB. 16- and 32-bit grey ("I;16", "I") are scaled to 8 bits first:
    PIL's own convert clips them, which turns a 16-bit photo white."""
    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64) / deep_grey_scale(image)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_image(path, size):
    """An RGB image, EXIF orientation applied, centre-cropped square and resized: uint8 (size, size, 3)."""
    with Image.open(path) as image:
        image = to_rgb(ImageOps.exif_transpose(image))
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def to_tensor(images):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images):
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images, columns, padding=2):
    """uint8 images (N, H, W, C) -> one uint8 image (H', W', C), `columns` to a row, each framed by
    `padding` black pixels (torchvision's make_grid layout)."""
    count, height, width, channels = images.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                    dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + padding) + padding, (i % columns) * (width + padding) + padding
        grid[top:top + height, left:left + width] = image
    return grid


# Modes in which the edited pixels are composited into the original as it is (16- and 32-bit grey
# included); the others (palette, 1-bit) are written as 8-bit RGB(A) or grey, every colour kept.
KEPT_MODES = ("RGB", "RGBA", "L", "LA", "CMYK", "I;16", "I")


def read_deep_rgb(path):
    """A 16-bit RGB or RGBA PNG as uint16 (H, W, 3 or 4) in RGB order, or None for any other file: Pillow
    reads those at 8 bits, so an edit written back from them would lose the low byte everywhere. Read
    with OpenCV (MediaPipe's own dependency)."""
    with open(path, "rb") as f:
        header = f.read(26)
    if header[:8] != b"\x89PNG\r\n\x1a\n" or header[24] != 16 or header[25] not in (2, 6):
        return None
    with Image.open(path) as image:
        if image.getexif().get(0x0112, 1) != 1:  # turned by its EXIF: edited at 8 bits, as read upright
            return None
    import cv2

    deep = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if deep is None or deep.dtype != np.uint16:
        return None
    return cv2.cvtColor(deep, cv2.COLOR_BGR2RGB if deep.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)


def write_deep_rgb(path, deep, text=None):
    """Write a uint16 RGB(A) array as a 16-bit PNG at `path` (a plain file path), with `text` ({key: str})
    as text chunks (OpenCV writes none)."""
    import cv2

    bgr = cv2.cvtColor(deep, cv2.COLOR_RGB2BGR if deep.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"OpenCV could not write {path}")
    if text:
        png = Path(path).read_bytes()
        chunks = b"".join(png_text_chunk(key, value) for key, value in text.items())
        Path(path).write_bytes(png[:-12] + chunks + png[-12:])  # before IEND, the last 12 bytes


def png_text_chunk(key, value):
    """One PNG text chunk: tEXt when the value is Latin-1, else iTXt (UTF-8)."""
    try:
        kind, data = b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")
    except UnicodeEncodeError:
        kind, data = b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def is_lossless_webp(path):
    """Whether a WebP file holds a lossless (VP8L) bitstream; Pillow reads both kinds without saying which."""
    with open(path, "rb") as f:
        header = f.read(64 * 1024)
    return header[12:16] == b"VP8L" or (header[12:16] == b"VP8X" and b"VP8L" in header[30:])


def kept_mode(image):
    """A PIL image in its own mode when edits and upscales can write it back that way (KEPT_MODES), else
    the nearest one that keeps every colour (and transparency)."""
    if image.mode in KEPT_MODES:
        return image
    has_alpha = image.mode == "PA" or "transparency" in image.info
    return image.convert("L" if image.mode == "1" else "RGBA" if has_alpha else "RGB")


def read_frames(path):
    """(every frame, EXIF orientation applied and in its own mode or the nearest kept one; the options that
    write them back the way they were encoded: ICC profile, EXIF (less the orientation tag), XMP, PNG text,
    JPEG tables, lossless WebP, an animation's frame timing and loop)."""
    with Image.open(path) as image:
        options = {"icc_profile": image.info.get("icc_profile"), "xmp": image.info.get("xmp"),
                   "text": dict(image.text) if image.format == "PNG" else None}
        if image.format == "JPEG":  # the source's own compression, not Pillow's default quality 75
            options.update(qtables=image.quantization, subsampling=JpegImagePlugin.get_sampling(image))
        if image.format == "WEBP" and is_lossless_webp(path):  # lossless stays lossless
            options.update(lossless=True, quality=100, exact=True)
        frames, durations = [], []
        for frame in ImageSequence.Iterator(image):
            durations.append(frame.info.get("duration", 100))
            frames.append(ImageOps.exif_transpose(frame))  # a copy, the orientation tag dropped from its EXIF
        if len(frames) > 1:
            options.update(duration=durations, loop=image.info.get("loop", 0))
    if "exif" in frames[0].info:
        options["exif"] = frames[0].info["exif"]
    return [kept_mode(frame) for frame in frames], {k: v for k, v in options.items() if v is not None and v != -1}


def read_photo(path):
    """read_frames of a still photo: (the picture, the options that write it back). Animated images are
    refused."""
    frames, options = read_frames(path)
    if len(frames) > 1:
        raise FacegenError(f"an animated image ({len(frames)} frames): only still photos can be edited")
    return frames[0], options


# ---------------------------------------------------------------------------------------------
# What an edit did, recorded beside the pixels
# ---------------------------------------------------------------------------------------------

EDITS_KEY = "facegen-edits"  # a PNG text chunk: the JSON list of the edits made, oldest first
XMP_NAMESPACE = "http://ns.facegen.invalid/1.0/"
_XMP_DESCRIPTION = re.compile(rb'<rdf:Description[^>]*xmlns:facegen="[^"]*"[^>]*>.*?</rdf:Description>', re.S)
_XMP_EDITS = re.compile(rb"<facegen:edits>(.*?)</facegen:edits>", re.S)
_EMPTY_XMP = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
              b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"></rdf:RDF></x:xmpmeta>'
              b'<?xpacket end="w"?>')


def edits_in(options):
    """The edits a photo read by read_frames records already (a list, oldest first)."""
    if EDITS_KEY in options.get("text", {}):
        return json.loads(options["text"][EDITS_KEY])
    ours = _XMP_DESCRIPTION.search(xmp_bytes(options))
    found = _XMP_EDITS.search(ours.group(0)) if ours else None
    return json.loads(xml.sax.saxutils.unescape(found.group(1).decode())) if found else []


def xmp_bytes(options):
    xmp = options.get("xmp") or b""
    return xmp.encode() if isinstance(xmp, str) else xmp


def with_edit_recorded(options, record):
    """read_frames' options with `record` (a JSON-able dict) added to the photo's list of edits: as a PNG
    text chunk (EDITS_KEY) and in the XMP packet (JPEG, WebP, TIFF) under facegen:edits, the photo's own
    XMP kept around it. save_image writes whichever one the format takes; the pixels are not touched."""
    edits = json.dumps(edits_in(options) + [record])
    description = (f'<rdf:Description rdf:about="" xmlns:facegen="{XMP_NAMESPACE}"><facegen:edits>'
                   f'{xml.sax.saxutils.escape(edits)}</facegen:edits></rdf:Description>').encode()
    xmp = xmp_bytes(options) or _EMPTY_XMP
    if _XMP_DESCRIPTION.search(xmp):
        xmp = _XMP_DESCRIPTION.sub(lambda _: description, xmp, count=1)
    elif b"</rdf:RDF>" in xmp:
        at = xmp.rindex(b"</rdf:RDF>")
        xmp = xmp[:at] + description + xmp[at:]
    else:  # a packet we cannot place ours in: ours alone
        xmp = _EMPTY_XMP.replace(b"</rdf:RDF>", description + b"</rdf:RDF>")
    return {**options, "text": {**options.get("text", {}), EDITS_KEY: edits}, "xmp": xmp}
