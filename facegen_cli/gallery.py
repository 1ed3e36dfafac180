"""Making and writing generated faces, the one place that `facegen generate` and the page's Generate tab
share: the attributes not asked for drawn from the model's label prior, their names (OUT/face-SEED.png,
OUT/grid-SEED.png), the request and settings in each PNG's metadata, the optional super-resolution, and the
refusal to replace faces already there. Faces are written a batch at a time, as they are made."""

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
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


def parameters_text(asked, seed, settings, size, model_name, fingerprint):
    """The `parameters` text chunk in the convention A1111's and ComfyUI's readers show: the attributes
    asked for as the prompt, those asked against as the negative prompt, then the settings."""
    wanted = [name for name, value in asked.items() if value > 0]
    against = [name for name, value in asked.items() if value < 0]
    lines = [", ".join(wanted)] + ([f"Negative prompt: {', '.join(against)}"] if against else [])
    lines.append(", ".join([f"Steps: {settings.steps}", f"Sampler: {settings.method.capitalize()}",
                            f"CFG scale: {settings.guidance:g}", f"Seed: {seed}", f"Size: {size}x{size}",
                            f"Model hash: {fingerprint}", f"Model: {model_name}", f"Version: facegen {__version__}"]))
    return "\n".join(lines)


class FaceWriter:
    """Writes generated faces as they are made (images in [-1, 1], one per seed, made for the
    attributes.AttributeRequest `request`) as PNGs that carry the request: the attributes asked, the seed,
    the sampler settings, the model (and the upscale factor). With `grid`, `finish` writes all of them as
    one image (the only thing kept between batches: the faces' pixels, for the grid)."""

    def __init__(self, pipe, request, settings, out, *, upscale=None, grid=False, model_name=None, overwrite=False):
        """overwrite: replace face files of those names; otherwise never, even ones another run wrote since."""
        self.out, self.upscale, self.grid, self.exclusive = Path(out), upscale, grid, not overwrite
        self.settings, self.size = settings, pipe.info.image_size
        self.meta = {**dataclasses.asdict(settings), "precision": pipe.precision, "version": __version__,
                     "fingerprint": pipe.fingerprint}
        self.net = None
        if upscale:
            from .upscale import load_upscaler

            self.net = load_upscaler(device=pipe.device)
            self.meta["upscale"] = upscale
        self.asked = dict(zip(pipe.attributes, request.condition()[0].tolist()))
        self.model_name = model_name
        self.seeds, self.tiles = [], []

    def write(self, seeds, images, conditions=None):
        """Write one batch (`conditions`: what each face was guided to, where the free attributes were drawn
        (LabelPrior), or None); returns the paths."""
        faces = [Image.fromarray(image) for image in to_uint8(images)]
        if self.net is not None:
            from .upscale import upscale_image

            faces = [upscale_image(self.net, face, self.upscale) for face in faces]

        drawn = [None] * len(seeds) if conditions is None else [dict(zip(self.asked, c)) for c in conditions.tolist()]

        def save(seed, face, path, guided_to):
            extra = {} if guided_to is None else {"drawn": guided_to}  # "attributes" stays what was asked
            meta = {"attributes": self.asked, **extra, "seed": seed, **self.meta, "model": self.model_name}
            parameters = parameters_text(self.asked, seed, self.settings, self.size, self.model_name,
                                         self.meta["fingerprint"])
            return save_image(face, path, {"facegen": meta, "parameters": parameters}, exclusive=self.exclusive)

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as writers:  # PNG encoding releases the GIL
            paths = list(writers.map(save, seeds, faces, face_paths(self.out, seeds), drawn))
        if self.grid:
            self.seeds += list(seeds)
            self.tiles += [np.asarray(face) for face in faces]
        return paths

    def finish(self):
        """The grid's path once written, or None without `grid`."""
        if not self.grid or not self.tiles:
            return None
        tiles = image_grid(np.stack(self.tiles), int(len(self.tiles) ** 0.5 + 0.999), padding=0)
        return save_image(Image.fromarray(tiles), grid_path(self.out, self.seeds[0]),
                          {"facegen": {"attributes": self.asked, "seeds": self.seeds, **self.meta}},
                          exclusive=self.exclusive)


def make_faces(pipe, request, seeds, settings, writer, *, prior=True, batch_size=None, on_batch=None):
    """Make the faces of an attributes.AttributeRequest, one per seed, and write each batch with `writer` (a
    FaceWriter) as it is made; yields each batch's paths. With `prior` and a model that carries a label
    prior, the attributes not asked for are drawn per face from the training faces' combinations
    (pipeline.draw_free) and the faces guided to them (guidance.composed); otherwise, or where no training
    face had the asked attributes together (said once), they stay free."""
    condition = request.condition()[0]
    conditions, drawn = pipe.draw_free(condition, seeds) if prior else (condition, None)
    if prior and pipe.prior is not None and drawn is None:
        log.warning(f"no training face had {request.describe()} together: the other attributes stay free")
    done = 0
    for batch_seeds, images in pipe.generate_batches(conditions, seeds, settings, reference=request.reference()[0],
                                                     drawn=drawn, batch_size=batch_size, on_batch=on_batch):
        batch = None if drawn is None else conditions[done:done + len(batch_seeds)]
        done += len(batch_seeds)
        yield writer.write(batch_seeds, images, batch)
