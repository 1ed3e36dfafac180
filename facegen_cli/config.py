"""Typed settings: presets (a model shape, training hyper-parameters and sampler defaults, one TOML file
each) and a model folder's description (`facegen.json`, read into `ModelInfo`).

The preset files live in the repository's `presets/` folder (`facegen_cli/presets` links to it).
`load_preset` takes a preset name or a path to a TOML file of the same form.
"""

import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
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
    # > 0: also keep power-function EMAs (posthoc_ema.py) and save their snapshots every N steps into
    # RUN/ema-snapshots, so that the EMA length can be chosen after training (`facegen export --ema-length`)
    posthoc_ema_every: int = 0
    laplacian_weight: float = 0.1  # 0 turns the Laplacian-pyramid term off
    attribute_dropout: float = 0.3  # each attribute set to 0 (free) with this probability
    # True: each example's attribute dropout drawn from U(0, 1) instead, so that requests of every size
    # are learned (with 0.3 and 12 attributes, one asked alone is 1 example in 75,000)
    uniform_dropout: bool = False
    condition_dropout: float = 0.1  # the whole vector set to 0 (unconditional) with this probability
    rare_rate: float = 0.0  # attributes rarer than this are oversampled up to it (0: plain epochs)
    t_mean: float = 0.0  # logit-normal timestep distribution
    t_std: float = 1.0
    # An inpainting model: the share of examples with part of the latent known (a face region or a box;
    # train.RegionMasks), the rest drawn whole
    inpaint_rate: float = 0.0
    precision: str = "fp32"  # devices.PRECISIONS: the networks' autocast while training
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 1000  # 0: no sample grids during training
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        from .devices import PRECISIONS

        if self.precision not in PRECISIONS:
            raise FacegenError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        if self.posthoc_ema_every < 0:
            raise FacegenError(f"posthoc_ema_every must be 0 (off) or a number of steps, not {self.posthoc_ema_every}")
        if not 0 <= self.inpaint_rate <= 1:
            raise FacegenError(f"inpaint_rate must be between 0 and 1, not {self.inpaint_rate}")


SAMPLERS = ("euler", "heun", "stochastic")
# the model calls of the shipped many-step sampler (13 Heun steps; 25 Euler steps before it)
MANY_STEPS = 25
MAX_GUIDANCE = 30


@dataclass(frozen=True)
class SampleConfig:
    """How a model samples: the one owner of these defaults. A command derives its own settings with
    `dataclasses.replace(pipe.sample, **overrides)`."""
    steps: int = 30
    method: str = "euler"
    # the share of each step's noise drawn afresh by the stochastic sampler (sampling.stochastic_step)
    eta: float = 0.5
    guidance: float = 3.0
    # the attributes drawn from the label prior for a generated face, guided from the all-free reference
    # (guidance.composed); the asked ones at `guidance` from there
    drawn_guidance: float = 1.5
    # (lo, hi): guidance only for lo <= t <= hi, the plain conditional prediction elsewhere (guidance.py)
    guidance_interval: Optional[tuple] = None
    # the weight of autoguidance by the model's guide (MODEL/guide, guidance.autoguided), which then takes
    # drawn_guidance's place; None: not used
    autoguidance: Optional[float] = None
    # a distilled model's one call per step (guidance.distilled): the guidance and the step size are its
    # inputs; false: classifier-free guidance of its plain conditional velocity, two or three calls a step
    distilled: bool = False

    def __post_init__(self):
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            if not (isinstance(interval, (list, tuple)) and len(interval) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
                    and 0 <= interval[0] < interval[1] <= 1):
                raise FacegenError(f"guidance_interval must be two times lo < hi from 0 to 1, not {interval!r}")
            object.__setattr__(self, "guidance_interval", (float(interval[0]), float(interval[1])))
        if self.method not in SAMPLERS:
            raise FacegenError(f"unknown sampler {self.method!r}; use {' or '.join(SAMPLERS)}")
        if not isinstance(self.distilled, bool):
            raise FacegenError(f"distilled must be true or false, not {self.distilled!r}")
        if not (isinstance(self.eta, (int, float)) and 0 <= self.eta <= 1):
            raise FacegenError(f"eta must be a number from 0 to 1, not {self.eta!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise FacegenError(f"sampling steps must be a whole number of at least 1, not {self.steps!r}")
        for value in (self.guidance, self.drawn_guidance, self.autoguidance):
            if value is None:  # autoguidance off
                continue
            if not math.isfinite(value):
                raise FacegenError(f"guidance must be a finite number, not {value}")
            if not -MAX_GUIDANCE <= value <= MAX_GUIDANCE:  # far past it a face is black or noise
                raise FacegenError(f"guidance {value:g} is out of range; use -{MAX_GUIDANCE} to {MAX_GUIDANCE}")

    def overridden(self, **overrides):
        """These settings with the given ones (None: keep these) put in."""
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})

    def undistilled(self):
        """These settings as the teacher (the model folder's DiT) samples them, with classifier-free guidance: a
        distilled model's few steps become the teacher's MANY_STEPS calls in Heun steps; other settings as they
        are."""
        return replace(self, distilled=False, steps=(MANY_STEPS + 1) // 2, method="heun") if self.distilled else self


@dataclass(frozen=True)
class ModelShape:
    """A LatentDiT's shape (a preset's [model] section); the attribute vocabulary comes from the data."""
    latent_size: int
    latent_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_size: int
    # An inpainting model: it also takes the mask and the known latent (model.inpainting_context)
    inpainting: bool = False
    # A framed model: it also draws zoomed views of the face, their framing an input (framing.py)
    framing: bool = False

    def __post_init__(self):
        for name in ("inpainting", "framing"):
            if not isinstance(getattr(self, name), bool):
                raise FacegenError(f"{name} must be true or false, not {getattr(self, name)!r}")
        for name, value in asdict(self).items():
            if name in ("inpainting", "framing"):
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise FacegenError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise FacegenError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads} and by 4")
        if self.latent_size % self.patch_size:
            raise FacegenError(f"latent_size {self.latent_size} must divide by patch_size {self.patch_size}")

    def config(self, attributes):
        """The LatentDiT configuration of this shape for a vocabulary."""
        shape = {k: v for k, v in asdict(self).items() if k != "inpainting"}  # framing is the model's own
        return {**shape, "context_channels": self.latent_channels + 1 if self.inpainting else 0,
                "attributes": list(attributes)}

    def build(self, attributes):
        from .model import LatentDiT

        return LatentDiT(**self.config(attributes))


@dataclass
class Preset:
    name: str
    model: ModelShape
    description: str = ""
    image_size: int = 128
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self):
        return asdict(self)

    def with_train(self, **overrides):
        """This preset with the given training settings (None: keep the preset's) replaced."""
        return replace(self, train=replace(self.train, **{k: v for k, v in overrides.items() if v is not None}))


def _section(cls, values, where):
    """A dataclass from a TOML or JSON section; unknown, missing and bad keys named in one line."""
    if not isinstance(values, dict):
        raise FacegenError(f"{where}: not a section of keys and values")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise FacegenError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise FacegenError(f"{where}: no {missing[0]!r}")
    try:
        return cls(**values)
    except FacegenError as e:
        raise FacegenError(f"{where}: {e}") from None


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
    if "model" not in data:
        raise FacegenError(f"preset {name}: no [model] section")
    return Preset(
        name=name,
        description=data.get("description", ""),
        image_size=data.get("image_size", 128),
        model=_section(ModelShape, data["model"], f"preset {name} [model]"),
        train=_section(TrainConfig, data.get("train", {}), f"preset {name} [train]"),
        sample=_section(SampleConfig, data.get("sample", {}), f"preset {name} [sample]"),
    )


MODEL_FORMAT = "facegen-model"


GENERIC_FOLDERS = ("model", "vae", "dit", "classifier")  # the sub-folders facegen writes, named for what they hold


@dataclass(frozen=True)
class Provenance:
    """Where a part of a model came from, portably: a name and a fingerprint of its weights
    (vae.weights_fingerprint), never a machine's path. The name of a local folder is its last part, with
    the one above it when the last is a generic sub-folder (runs/vae-faces/vae: "vae-faces/vae"); a hub
    id is kept whole."""
    name: str
    fingerprint: str

    @classmethod
    def of(cls, source, fingerprint):
        path = Path(source)
        if not path.exists():  # a hub id
            return cls(name=str(source), fingerprint=fingerprint)
        parts = path.resolve().parts
        keep = 2 if parts[-1] in GENERIC_FOLDERS and len(parts) > 2 else 1
        return cls(name="/".join(parts[-keep:]), fingerprint=fingerprint)


@dataclass(kw_only=True)
class ModelInfo:
    """A model folder's description (MODEL/facegen.json): how its latents are scaled and how it samples."""
    format: str = MODEL_FORMAT
    version: int = 2
    preset: str = ""
    image_size: int
    latent_mean: list  # one per latent channel: the DiT works on (latent - mean) / std
    latent_std: list
    vae: Optional[Provenance] = None  # the autoencoder whose encoder made the training latents (encoder fingerprint)
    decoder: Optional[Provenance] = None  # an autoencoder with the same encoder whose decoder replaced it
    sample: SampleConfig = field(default_factory=SampleConfig)
    init_from: Optional[Provenance] = None  # the model a fine-tuning run started from (its DiT's weights)
    trained_steps: Optional[int] = None
    # the student's (MODEL/student, distill.py): its teacher (the DiT as it was distilled from) and its steps
    distilled_from: Optional[Provenance] = None
    distilled_steps: Optional[int] = None
    # the relative width of the post-hoc EMA (posthoc_ema.py) the DiT's weights were reconstructed at; None:
    # the training run's fixed-decay EMA
    ema_length: Optional[float] = None

    def __post_init__(self):
        if not (isinstance(self.image_size, int) and self.image_size >= 8 and self.image_size % 8 == 0):
            raise FacegenError(f"image_size must be a whole number of pixels, a multiple of 8, not {self.image_size!r}")
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
        values["sample"] = _section(SampleConfig, data.get("sample", {}), f"{where} [sample]")  # names itself
        for key in ("vae", "decoder", "init_from", "distilled_from"):
            if isinstance(values.get(key), dict):
                values[key] = _section(Provenance, values[key], f"{where} [{key}]")
            elif values.get(key) is not None:  # version 1 recorded a path here: no longer kept
                values[key] = None
        try:
            return cls(**values)
        except (FacegenError, TypeError) as e:
            raise FacegenError(f"{where}: {e}") from None

    def to_dict(self):
        return {key: value for key, value in asdict(self).items() if value is not None}
