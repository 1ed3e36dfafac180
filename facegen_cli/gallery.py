"""Writing generated faces, the one place that `facegen generate` and the page's Generate tab share:
their names (OUT/face-SEED.png, OUT/grid-SEED.png), the request and settings in each PNG's metadata, the
optional super-resolution, and the refusal to replace faces already there."""

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FacegenError
from .files import save_image
from .images import image_grid, to_uint8

log = logging.getLogger(__name__)


def face_paths(out, seeds):
    """Where the faces of `seeds` go: OUT/face-SEED.png, the seed in ten digits."""
    return [Path(out) / f"face-{seed:010d}.png" for seed in seeds]


def grid_path(out, first_seed):
    return Path(out) / f"grid-{first_seed:010d}.png"


def refuse_existing(paths, overwrite=False):
    """Fail before sampling when a face file is there already, unless `overwrite`."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FacegenError(f"{existing[0]}" + (f" and {len(existing) - 1} more" if len(existing) > 1 else "")
                           + " exist; --overwrite replaces them, or choose another --out or --seed")


def save_faces(pipe, images, request, seeds, settings, out, *, upscale=None, grid=False, model_name=None):
    """Write generated faces (images in [-1, 1], one per seed, made for the attributes.AttributeRequest
    `request`) as PNGs that carry the request: the attributes asked, the seed, the sampler settings, the
    model (and the upscale factor). With `grid`, also all of them as one image. Yields each path as it is
    written."""
    faces = [Image.fromarray(image) for image in to_uint8(images)]
    meta = {**dataclasses.asdict(settings), "precision": pipe.precision}
    if upscale:
        from .upscale import load_upscaler, upscale_image

        net = load_upscaler(device=pipe.device)
        faces = [upscale_image(net, face, upscale) for face in faces]
        meta["upscale"] = upscale
    asked = dict(zip(pipe.attributes, request.condition()[0].tolist()))

    def save(seed, face, path):
        return save_image(face, path, {"facegen": {"attributes": asked, "seed": seed, **meta, "model": model_name}})

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as writers:  # PNG encoding releases the GIL
        yield from writers.map(save, seeds, faces, face_paths(out, seeds))
    if grid:
        tiles = image_grid(np.stack([np.asarray(face) for face in faces]), int(len(faces) ** 0.5 + 0.999), padding=0)
        yield save_image(Image.fromarray(tiles), grid_path(out, seeds[0]),
                         {"facegen": {"attributes": asked, "seeds": seeds, **meta}})
