"""A facegen model folder and what it does: latents <-> images and attribute-controlled sampling.

    MODEL/facegen.json   config.ModelInfo: image size, latent mean/std, preset name, sampler settings
    MODEL/dit/           LatentDiT.save_pretrained (config.json with the attribute vocabulary
                         + diffusion_pytorch_model.safetensors, EMA weights)
    MODEL/vae/           AutoencoderKL.save_pretrained
"""

import copy
import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import flow, vae as vae_lib
from .config import ModelInfo, SampleConfig
from .errors import FacegenError, first_line
from .files import atomic_dir
from .model import LatentDiT

MODEL_FILE = "facegen.json"
# The models inside the package, by name: real faces (CelebA) and the built-in drawn faces (exact labels).
FACES_MODEL = Path(__file__).parent / "faces"
DEMO_MODEL = Path(__file__).parent / "demo"
SHIPPED_MODELS = {"faces": FACES_MODEL, "demo": DEMO_MODEL}


PRECISIONS = ("auto", "fp32", "bf16")


def fast_bf16(device):
    """Whether bfloat16 matrix products are native on `device` (recent GPUs; CPUs with AVX-512 BF16 or
    AMX): there sampling in bf16 takes about half the time. Elsewhere it is emulated, and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def model_path(name_or_path=None):
    """The folder of a model: a path, or the name of a shipped model (faces, demo), or None for the default
    (the real-face model where this installation ships it). A folder of that name in the working directory
    wins over the shipped model."""
    if name_or_path is None:
        for path in SHIPPED_MODELS.values():
            if (path / MODEL_FILE).is_file():
                return path
        raise FacegenError("no --model given and this installation ships no model; "
                           "train one with `facegen train` and pass --model RUN/model")
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(name_or_path)]
    return path


class FacegenPipeline:
    """A loaded model folder (the front door, as a diffusers pipeline is): its DiT, its VAE and its
    `ModelInfo`, whose `sample` settings every command starts from."""

    def __init__(self, dit, vae, info: ModelInfo, path=None, precision="fp32"):
        """precision: fp32, bf16, or auto (bf16 where the DiT's device does it natively, else fp32)."""
        if precision not in PRECISIONS:
            raise FacegenError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        if precision == "auto":
            precision = "bf16" if fast_bf16(dit.device) else "fp32"
        self.dit, self.vae, self.info, self.path, self.precision = dit, vae, info, path, precision
        shape = (1, -1, 1, 1)
        self.latent_mean = torch.tensor(info.latent_mean).view(shape)
        self.latent_std = torch.tensor(info.latent_std).view(shape)

    @property
    def attributes(self):
        return self.dit.attributes

    @property
    def sample(self) -> SampleConfig:
        return self.info.sample

    def settings(self, **overrides) -> SampleConfig:
        """The model's sampler settings with the given ones (None: keep the model's) put in."""
        return dataclasses.replace(self.sample, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def device(self):
        return self.dit.device

    def autocast(self):
        """The context the networks run in: bfloat16 autocast when the precision is bf16 (the latents are
        still integrated in float32), nothing otherwise."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")

    def load_classifier(self):
        """The attribute classifier the model folder carries (MODEL/classifier), or None."""
        from .classifier import load_classifier

        folder = self.path / "classifier" if self.path else None
        return load_classifier(folder, self.device)[0] if folder and folder.is_dir() else None

    @classmethod
    def load(cls, path=None, device="cpu", precision="fp32"):
        """A model folder (a path or a shipped model's name) on `device`, run in `precision` (see __init__)."""
        path = model_path(path)
        if not path.is_dir():
            raise FacegenError(f"{path}: no such model folder")
        if not (path / MODEL_FILE).is_file():
            raise FacegenError(f"{path}: not a facegen model (no {MODEL_FILE}); "
                               "give the model/ folder that `facegen train` writes")
        try:
            info = ModelInfo.from_dict(json.loads((path / MODEL_FILE).read_text()), path / MODEL_FILE)
        except (OSError, ValueError) as e:
            raise FacegenError(f"{path / MODEL_FILE}: not readable JSON ({first_line(e)})") from None
        try:
            dit = LatentDiT.from_pretrained(path / "dit")
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise FacegenError(f"{path}: the DiT checkpoint does not load: {first_line(e)}") from None
        vae = vae_lib.load_vae(path / "vae", device)
        return cls(dit.to(device).eval().requires_grad_(False), vae, info, path, precision)

    def with_vae(self, vae, source):
        """This model with another autoencoder that has the same encoder, and so the same latents (a decoder
        fine-tuned with `facegen vae train --init VAE --decoder-only`)."""
        if vae_lib.vae_fingerprint(vae, encoder_only=True) != vae_lib.vae_fingerprint(self.vae, encoder_only=True):
            raise FacegenError(f"{source}: its encoder is not the model's, so its decoder would read other latents; "
                               "make one with `facegen vae train --init MODEL/vae --decoder-only`")
        info = dataclasses.replace(self.info, decoder_source=str(source))
        return FacegenPipeline(self.dit, vae.to(self.device), info, self.path, self.precision)

    def save(self, path, dtype=None):
        """Write the model folder; dtype=torch.float16 halves its size (loading casts back to float32)."""
        with atomic_dir(path) as tmp:
            for name, module in (("dit", self.dit), ("vae", self.vae)):
                (module if dtype is None else copy.deepcopy(module).to(dtype)).save_pretrained(tmp / name)
            (tmp / MODEL_FILE).write_text(json.dumps(self.info.to_dict(), indent=2) + "\n")
        return Path(path)

    def normalize(self, latents):
        return (latents - self.latent_mean.to(latents)) / self.latent_std.to(latents)

    def encode(self, images):
        """Images in [-1, 1] -> normalised latents, the DiT's data space."""
        with self.autocast():
            return self.normalize(vae_lib.encode(self.vae, images))

    def decode(self, latents):
        """Normalised latents -> images in [-1, 1]."""
        with self.autocast():
            return vae_lib.decode(self.vae, latents * self.latent_std.to(latents) + self.latent_mean.to(latents))

    def noise(self, seeds):
        """One Gaussian latent per seed, independent of batch composition."""
        shape = (self.dit.config.latent_channels, self.dit.config.latent_size, self.dit.config.latent_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def default_batch_size(self):
        """Faces per sampling batch when none is given: 16 on a CPU (larger batches are no faster there);
        on a GPU as many as a quarter of its free memory holds, at a generous estimate of what decoding one
        face takes (six float32 maps of the VAE's widest layer at full size), at most 1,024."""
        if self.device.type != "cuda":
            return 16
        per_face = 6 * 4 * max(self.vae.config.block_out_channels) * self.info.image_size ** 2
        return int(max(16, min(1024, torch.cuda.mem_get_info(self.device)[0] // 4 // per_face)))

    def generate(self, y, seeds, settings=None, batch_size=None, on_batch=None):
        """Images in [-1, 1], one per seed, for attribute request(s) y of shape (A,) or (len(seeds), A),
        sampled with `settings` (a SampleConfig; default: the model's), `batch_size` at a time (default:
        default_batch_size())."""
        settings = settings or self.sample
        batch_size = batch_size or self.default_batch_size()
        y = y.expand(len(seeds), -1) if y.ndim == 1 else y
        images = []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            noise = self.noise(chunk).to(self.device)
            with self.autocast():
                latents = flow.sample(self.dit, noise, y[start:start + len(chunk)].to(self.device), settings)
            images.append(self.decode(latents).cpu())
            if on_batch:
                on_batch(len(chunk))
        return torch.cat(images)


def save_faces(pipe, images, y, seeds, settings, paths, upscale=None, grid=None, model_name=None, log=print):
    """Write generated faces (images in [-1, 1], one per seed) as PNGs that carry their request: the
    attributes asked, the seed, the sampler settings, the model (and the upscale factor). With `grid`,
    also all of them as one image there. Yields each path as it is written."""
    from PIL import Image

    from .data import image_grid, to_uint8
    from .files import save_image

    faces = [Image.fromarray(image) for image in to_uint8(images)]
    meta = {**dataclasses.asdict(settings), "precision": pipe.precision}
    if upscale:
        from .upscale import load_upscaler, upscale_image

        net = load_upscaler(device=pipe.device, log=log)
        faces = [upscale_image(net, face, upscale) for face in faces]
        meta["upscale"] = upscale
    asked = dict(zip(pipe.attributes, y.tolist()))

    def save(seed, face, path):
        return save_image(face, path, {"facegen": {"attributes": asked, "seed": seed, **meta, "model": model_name}})

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as writers:  # PNG encoding releases the GIL
        yield from writers.map(save, seeds, faces, paths)
    if grid is not None:
        tiles = image_grid(np.stack([np.asarray(face) for face in faces]), int(len(faces) ** 0.5 + 0.999), padding=0)
        yield save_image(Image.fromarray(tiles), grid, {"facegen": {"attributes": asked, "seeds": seeds, **meta}})
