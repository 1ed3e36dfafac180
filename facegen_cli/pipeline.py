"""A facegen model folder and what it does: latents <-> images and attribute-controlled sampling.

    MODEL/facegen.json   image size, latent mean/std, preset name, sampler defaults
    MODEL/dit/           LatentDiT.save_pretrained (config.json with the attribute vocabulary
                         + diffusion_pytorch_model.safetensors, EMA weights)
    MODEL/vae/           AutoencoderKL.save_pretrained
"""

import copy
import json
import math
from pathlib import Path

import torch

from . import flow, vae as vae_lib
from .errors import FacegenError, first_line
from .files import atomic_dir
from .model import LatentDiT

MODEL_FILE = "facegen.json"
# The models inside the package, by name: real faces (CelebA) and the built-in drawn faces (exact labels).
FACES_MODEL = Path(__file__).parent / "faces"
DEMO_MODEL = Path(__file__).parent / "demo"
SHIPPED_MODELS = {"faces": FACES_MODEL, "demo": DEMO_MODEL}


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


def check_info(info, where):
    """A model's facegen.json must give the image size and a finite mean and positive std per latent channel."""
    if not isinstance(info, dict):
        raise FacegenError(f"{where}: not a facegen model description")
    for key in ("image_size", "latent_mean", "latent_std"):
        if key not in info:
            raise FacegenError(f"{where}: no {key!r}")
    mean, std = info["latent_mean"], info["latent_std"]
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and mean
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std)
            and all(v > 0 for v in std)):
        raise FacegenError(f"{where}: latent_mean and latent_std must be lists of finite numbers, one per channel, "
                           "every std above 0")


class FacegenModel:
    def __init__(self, dit, vae, info, path=None):
        self.dit, self.vae, self.info, self.path = dit, vae, info, path
        shape = (1, -1, 1, 1)
        self.latent_mean = torch.tensor(info["latent_mean"]).view(shape)
        self.latent_std = torch.tensor(info["latent_std"]).view(shape)

    @property
    def attributes(self):
        return self.dit.attributes

    @property
    def device(self):
        return self.dit.device

    @classmethod
    def load(cls, path=None, device="cpu"):
        path = model_path(path)
        if not path.is_dir():
            raise FacegenError(f"{path}: no such model folder")
        if not (path / MODEL_FILE).is_file():
            raise FacegenError(f"{path}: not a facegen model (no {MODEL_FILE}); "
                               "give the model/ folder that `facegen train` writes")
        try:
            info = json.loads((path / MODEL_FILE).read_text())
        except (OSError, ValueError) as e:
            raise FacegenError(f"{path / MODEL_FILE}: not readable JSON ({first_line(e)})") from None
        check_info(info, path / MODEL_FILE)
        try:
            dit = LatentDiT.from_pretrained(path / "dit")
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise FacegenError(f"{path}: the DiT checkpoint does not load: {first_line(e)}") from None
        vae = vae_lib.load_vae(path / "vae", device)
        return cls(dit.to(device).eval().requires_grad_(False), vae, info, path)

    def save(self, path, dtype=None):
        """Write the model folder; dtype=torch.float16 halves its size (loading casts back to float32)."""
        with atomic_dir(path) as tmp:
            for name, module in (("dit", self.dit), ("vae", self.vae)):
                (module if dtype is None else copy.deepcopy(module).to(dtype)).save_pretrained(tmp / name)
            (tmp / MODEL_FILE).write_text(json.dumps(self.info, indent=2) + "\n")
        return Path(path)

    def normalize(self, latents):
        return (latents - self.latent_mean.to(latents)) / self.latent_std.to(latents)

    def encode(self, images):
        """Images in [-1, 1] -> normalised latents, the DiT's data space."""
        return self.normalize(vae_lib.encode(self.vae, images))

    def decode(self, latents):
        """Normalised latents -> images in [-1, 1]."""
        return vae_lib.decode(self.vae, latents * self.latent_std.to(latents) + self.latent_mean.to(latents))

    def noise(self, seeds):
        """One Gaussian latent per seed, independent of batch composition."""
        shape = (self.dit.config.latent_channels, self.dit.config.latent_size, self.dit.config.latent_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def generate(self, y, seeds, steps=None, guidance=None, method=None, batch_size=16, on_batch=None):
        """Images in [-1, 1], one per seed, for attribute request(s) y of shape (A,) or (len(seeds), A)."""
        defaults = self.info.get("sample", {})
        steps = steps or defaults.get("steps", 30)
        guidance = defaults.get("guidance", 3.0) if guidance is None else guidance
        method = method or defaults.get("method", "euler")
        y = y.expand(len(seeds), -1) if y.ndim == 1 else y
        images = []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            noise = self.noise(chunk).to(self.device)
            latents = flow.sample(self.dit, noise, y[start:start + len(chunk)].to(self.device),
                                  steps=steps, guidance=guidance, method=method)
            images.append(self.decode(latents).cpu())
            if on_batch:
                on_batch(len(chunk))
        return torch.cat(images)
