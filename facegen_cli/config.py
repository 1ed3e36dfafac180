"""Typed settings: presets (a model shape, training hyper-parameters and sampler defaults, one TOML file
each) and a model folder's description (`facegen.json`, read into `ModelInfo`).

The preset files live in the repository's `presets/` folder (`facegen_cli/presets` links to it).
`load_preset` takes a preset name or a path to a TOML file of the same form.
"""

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .errors import FacegenError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class TrainConfig:
    batch_size: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    cooldown_steps: int = 0  # the last N steps before the end decay the learning rate linearly to 0
    max_steps: int = 100_000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    laplacian_weight: float = 0.1  # 0 turns the Laplacian-pyramid term off
    attribute_dropout: float = 0.3  # each attribute set to 0 (free) with this probability
    # True: each example's attribute dropout drawn from U(0, 1) instead, so that requests of every size
    # are learned (with 0.3 and 12 attributes, one asked alone is 1 example in 75,000)
    uniform_dropout: bool = False
    condition_dropout: float = 0.1  # the whole vector set to 0 (unconditional) with this probability
    rare_rate: float = 0.0  # attributes rarer than this are oversampled up to it (0: plain epochs)
    t_mean: float = 0.0  # logit-normal timestep distribution
    t_std: float = 1.0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate's names)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 1000  # 0: no sample grids during training
    log_every: int = 10
    seed: int = 0


SAMPLERS = ("euler", "heun")


@dataclass(frozen=True)
class SampleConfig:
    """How a model samples: the one owner of these defaults. A command derives its own settings with
    `dataclasses.replace(pipe.sample, **overrides)`."""
    steps: int = 30
    method: str = "euler"
    guidance: float = 3.0

    def __post_init__(self):
        if self.method not in SAMPLERS:
            raise FacegenError(f"unknown sampler {self.method!r}; use {' or '.join(SAMPLERS)}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise FacegenError(f"sampling steps must be a whole number of at least 1, not {self.steps!r}")
        if not math.isfinite(self.guidance):
            raise FacegenError(f"guidance must be a finite number, not {self.guidance}")


@dataclass
class Preset:
    name: str
    description: str = ""
    image_size: int = 128
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self):
        return asdict(self)


def _section(cls, values, where):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise FacegenError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def preset_names():
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path):
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text, name = path.read_text(), path.stem
    else:
        candidate = PRESET_DIR / f"{name_or_path}.toml"
        if not candidate.is_file():
            raise FacegenError(f"unknown preset {str(name_or_path)!r}; choose one of {', '.join(preset_names())} "
                               "or give a .toml file")
        text, name = candidate.read_text(), str(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FacegenError(f"preset {name}: not valid TOML ({e})") from None
    return Preset(
        name=name,
        description=data.get("description", ""),
        image_size=data.get("image_size", 128),
        model=data.get("model", {}),
        train=_section(TrainConfig, data.get("train", {}), f"preset {name} [train]"),
        sample=_section(SampleConfig, data.get("sample", {}), f"preset {name} [sample]"),
    )


MODEL_FORMAT = "facegen-model"


@dataclass(kw_only=True)
class ModelInfo:
    """A model folder's description (MODEL/facegen.json): how its latents are scaled and how it samples."""
    format: str = MODEL_FORMAT
    version: int = 1
    preset: str = ""
    image_size: int
    latent_mean: list  # one per latent channel: the DiT works on (latent - mean) / std
    latent_std: list
    vae_source: str = ""  # the VAE the training latents were encoded with
    decoder_source: Optional[str] = None  # an autoencoder with the same encoder whose decoder replaced it
    sample: SampleConfig = field(default_factory=SampleConfig)
    init_from: Optional[str] = None  # the model folder a fine-tuning run started from
    trained_steps: Optional[int] = None

    def __post_init__(self):
        mean, std = self.latent_mean, self.latent_std
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and mean
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std)
                and all(v > 0 for v in std)):
            raise FacegenError("latent_mean and latent_std must be lists of finite numbers, one per channel, "
                               "every std above 0")

    @classmethod
    def from_dict(cls, data, where):
        """Read a facegen.json's contents; keys this version does not know are ignored, missing ones named."""
        if not isinstance(data, dict) or data.get("format", MODEL_FORMAT) != MODEL_FORMAT:
            raise FacegenError(f"{where}: not a facegen model description")
        missing = [key for key in ("image_size", "latent_mean", "latent_std") if key not in data]
        if missing:
            raise FacegenError(f"{where}: no {missing[0]!r}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["sample"] = _section(SampleConfig, data.get("sample", {}), f"{where} [sample]")
            return cls(**values)
        except FacegenError as e:
            raise FacegenError(f"{where}: {e}") from None
        except TypeError as e:
            raise FacegenError(f"{where}: {e}") from None

    def to_dict(self):
        return {key: value for key, value in asdict(self).items() if value is not None}
