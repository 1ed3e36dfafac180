"""Presets: a model shape, training hyper-parameters and sampler defaults, one TOML file each.

The files live in the repository's `presets/` folder (`facegen_cli/presets` links to it).
`load_preset` takes a preset name or a path to a TOML file of the same form.
"""

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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


@dataclass
class SampleConfig:
    steps: int = 30
    method: str = "euler"
    guidance: float = 3.0


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
