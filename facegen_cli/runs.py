"""What every training run shares (the DiT's and the VAE's): seeded per-step randomness, epochs of
batches, the learning-rate schedule and the checkpoint folders.

    RUN/checkpoints/step-NNNNNN/  <name>.safetensors per network, <name>.pt per optimizer or EMA state,
                                  state.json (the step and what the run was made with)

Every random choice of step s comes from a generator seeded by (seed, stream, s, ...), so a run that
resumes from a checkpoint continues bit for bit where it stopped.
"""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import FacegenError, first_line
from .files import atomic_dir

STEP_STREAM, ORDER_STREAM, AUGMENT_STREAM = 0, 1, 2


def seeded_generator(*keys, device="cpu"):
    """A torch generator on `device` whose stream depends on every key (non-negative integers)."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def batch_indices(num_items, batch_size, step, seed, rank=0, world_size=1):
    """This process's share of step `step`'s batch: epochs are fixed permutations of the data."""
    per_epoch = max(num_items // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=seeded_generator(seed, ORDER_STREAM, epoch))
    batch = order[position * batch_size:(position + 1) * batch_size]
    return batch[rank::world_size]


def scheduled_lr(step, peak, warmup_steps, max_steps, cooldown_steps=0):
    """Warmup, then constant, then (cooldown_steps > 0) a linear decay to 0 at max_steps.

    The constant phase is what `--resume` extends; the cooldown is how a run ends (the
    warmup-stable-decay schedule), so the length of a run need not be fixed when it starts.
    """
    warmup = (step + 1) / max(warmup_steps, 1)
    cooldown = (max_steps - step) / cooldown_steps if cooldown_steps else 1.0
    return peak * min(1.0, warmup, cooldown)


def save_checkpoint(out, step, networks, states, run_state, keep):
    """RUN/checkpoints/step-N: each network's weights ({name: state dict} -> name.safetensors), each other
    state ({name: optimizer or EMA state} -> name.pt) and run_state + the step (state.json), written
    atomically; only the newest `keep` checkpoints stay."""
    with atomic_dir(Path(out) / "checkpoints" / f"step-{step:06d}") as tmp:
        for name, weights in networks.items():
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / f"{name}.safetensors")
        for name, state in states.items():
            torch.save(state, tmp / f"{name}.pt")
        (tmp / "state.json").write_text(json.dumps({**run_state, "step": step}, indent=2))
    for old in sorted((Path(out) / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def latest_checkpoint(out):
    done = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


# What reading a damaged checkpoint file raises (cut short, overwritten, not a checkpoint at all).
DAMAGED_CHECKPOINT_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError,
                             SafetensorError)


def read_checkpoint(path, networks, states):
    """A checkpoint folder read whole into memory: (state.json, {network: weights}, {name: state})."""
    return (json.loads((path / "state.json").read_text()),
            {name: load_file(path / f"{name}.safetensors") for name in networks},
            {name: torch.load(path / f"{name}.pt", weights_only=True) for name in states})


def newest_intact_checkpoint(out, networks, states, log):
    """(path, read_checkpoint(path, ...)) of the newest checkpoint that reads back whole, or None when there
    is none; each damaged newer one is reported and passed over."""
    for path in sorted((Path(out) / "checkpoints").glob("step-*"), reverse=True):
        try:
            return path, read_checkpoint(path, networks, states)
        except DAMAGED_CHECKPOINT_ERRORS as e:
            log(f"{path} is damaged ({first_line(e)}); trying the checkpoint before it")
    if any((Path(out) / "checkpoints").glob("step-*")):
        raise FacegenError(f"{out}: every checkpoint is damaged; start a new run with another --out")
    return None


def check_same_run(path, saved, expected):
    """Refuse to resume from a checkpoint made with other settings (preset, model shape, attributes, ...)."""
    for key, value in expected.items():
        if saved.get(key) != value:
            raise FacegenError(f"{path} was made with {key.replace('_', ' ')} {saved.get(key)!r}, "
                               f"not {value!r}; resume with the same settings and data")
