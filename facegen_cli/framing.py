"""Zoomed framings: more latent cells for a small region (SDXL's crop conditioning, made a zoom).

The model's canonical framing puts a whole face in 128 px, so a mustache gets two rows of 16x16 latent
cells. A framed model (LatentDiT(framing=True)) also draws zoomed views of that frame: a square of the
canonical crop, `zoom` times smaller, centred on (cx, cy) in the canonical crop's pixels, resampled from
the photo at the model's size. The framing is a condition of the DiT (model.FramingEmbedder), so one
network draws whole faces (zoom 1, centred: the embedding's zero) and close-ups of a mouth or the eyes.

A view is only as sharp as the photo under it: a zoom is drawn, and used, only up to what the photo's own
pixels hold (zoom_limit), so that the model never learns, and is never asked for, an enlarged blur.
"""

import logging
import zlib
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import cache_image_paths, read_meta
from .layout import read_framings

log = logging.getLogger(__name__)

MAX_ZOOM = 2.0  # the most the CelebA crops hold (their faces are about 1.6x the framing)
# A view may enlarge the photo a little (1.25x: bicubic keeps that crisp) but no more.
SHARPNESS = 1.25
# The least zoom worth a view of its own: below it the canonical framing is drawn instead.
MIN_ZOOM = 1.15
WHOLE_SHARE = 0.3  # training views drawn whole even where the photo holds a zoom, for generation


@dataclass(frozen=True)
class Framing:
    """A square view of the canonical size x size crop: `zoom` times smaller, centred on (cx, cy)."""
    zoom: float = 1.0
    cx: float = 64.0
    cy: float = 64.0

    @classmethod
    def whole(cls, size):
        return cls(1.0, size / 2, size / 2)

    def matrix(self, size):
        """The 2x3 matrix from the canonical crop's pixels to the view's."""
        z = self.zoom
        return np.array([[z, 0, size / 2 - z * self.cx], [0, z, size / 2 - z * self.cy]], dtype=np.float64)

    def of(self, matrix, size):
        """The photo -> view matrix of a photo -> canonical crop `matrix`."""
        return compose(self.matrix(size), matrix)


def compose(outer, inner):
    """The 2x3 matrix of applying `inner`, then `outer`."""
    return outer @ np.vstack([inner, [0.0, 0.0, 1.0]])


def features(framings, size):
    """(B, 3) float32 model inputs of a list of Framings: log zoom and the centre's offset from the
    crop's centre in half-crops, so that the whole face is exactly 0."""
    half = size / 2
    return torch.tensor([[np.log(f.zoom), (f.cx - half) / half, (f.cy - half) / half] for f in framings],
                        dtype=torch.float32)


def zoom_limit(scale):
    """The largest zoom a photo whose face is `scale` photo pixels per canonical crop pixel holds."""
    return float(min(MAX_ZOOM, max(1.0, scale * SHARPNESS)))


def centred(zoom, cx, cy, size):
    """A Framing of `zoom` as near (cx, cy) as keeps the view inside the canonical crop."""
    half = size / (2 * zoom)
    return Framing(zoom, float(np.clip(cx, half, size - half)), float(np.clip(cy, half, size - half)))


def drawn(name, scale, size):
    """The training view of the photo `name` (a fixed draw from its name): whole where the photo holds
    less than MIN_ZOOM or for WHOLE_SHARE of the photos, else a zoom up to zoom_limit(scale), its centre
    anywhere that keeps the view inside the canonical crop."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    limit = zoom_limit(scale)
    whole, u, x, y = rng.random(4)
    if limit < MIN_ZOOM or whole < WHOLE_SHARE:
        return Framing.whole(size)
    zoom = MIN_ZOOM * (limit / MIN_ZOOM) ** u  # log-uniform
    half = size / (2 * zoom)
    return Framing(float(zoom), float(half + x * (size - 2 * half)), float(half + y * (size - 2 * half)))


def covering(box, scale, size, margin=6):
    """The view an edit repaints a region in: the largest zoom up to zoom_limit(scale) whose view holds the
    region's box (left, top, right, bottom in the canonical crop) with `margin` pixels around it, centred on
    the box; the whole face where no zoom of at least MIN_ZOOM fits."""
    left, top, right, bottom = box
    extent = max(right - left, bottom - top) + 2 * margin
    zoom = min(zoom_limit(scale), size / extent)
    if zoom < MIN_ZOOM:
        return Framing.whole(size)
    return centred(zoom, (left + right) / 2, (top + bottom) / 2, size)


def framing_bank(cache_dir, size):
    """(N, 3) features of the view each latent of a cache is, from the list_framing.txt of the data folder
    it was encoded from (layout.read_framings); whole faces where it lists none."""
    data_root = read_meta(cache_dir).data
    listed = read_framings(data_root) if Path(data_root).is_dir() else {}
    whole = astuple(Framing.whole(size))
    views = [Framing(*listed.get(path.name, whole)) for path in cache_image_paths(cache_dir)]
    zoomed = sum(v.zoom > 1 for v in views)
    log.info(f"{zoomed} of {len(views)} latents are zoomed views" if zoomed else
             f"{data_root} lists no zoomed views: the framed model learns whole faces only")
    return features(views, size)
