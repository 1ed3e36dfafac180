"""The training skeleton every trainer shares (the DiT's, the VAE's and the classifier's): a TrainingRun
holds accelerate (any device, autocast in the run's precision), the networks and optimizers, their
checkpoints and the step a resumed run starts from; plus seeded per-step randomness, epochs of batches
and the learning-rate schedule.

    RUN/checkpoints/step-NNNNNN/  <name>.safetensors per network, <name>.pt per optimizer, EMA or other
                                  state, state.json (the step and what the run was made with)
    RUN/log.jsonl                 one line per logged step

Every random choice of step s comes from a generator seeded by (seed, stream, s, ...), so a run that
resumes from a checkpoint continues bit for bit where it stopped.
"""

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file

from .devices import accelerate_precision
from .errors import FacegenError, first_line
from .files import atomic_dir, save_tensors

log = logging.getLogger(__name__)

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
            save_tensors({k: v.contiguous() for k, v in weights.items()}, tmp / f"{name}.safetensors")
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


def newest_intact_checkpoint(out, networks, states):
    """(path, read_checkpoint(path, ...)) of the newest checkpoint that reads back whole, or None when there
    is none; each damaged newer one is reported and passed over."""
    for path in sorted((Path(out) / "checkpoints").glob("step-*"), reverse=True):
        try:
            return path, read_checkpoint(path, networks, states)
        except DAMAGED_CHECKPOINT_ERRORS as e:
            log.warning(f"{path} is damaged ({first_line(e)}); trying the checkpoint before it")
    if any((Path(out) / "checkpoints").glob("step-*")):
        raise FacegenError(f"{out}: every checkpoint is damaged; start a new run with another --out")
    return None


def check_same_run(path, saved, expected):
    """Refuse to resume from a checkpoint made with other settings (preset, model shape, attributes, ...)."""
    for key, value in expected.items():
        if saved.get(key) != value:
            raise FacegenError(f"{path} was made with {key.replace('_', ' ')} {saved.get(key)!r}, "
                               f"not {value!r}; resume with the same settings and data")


class GeneratorState:
    """A torch generator as a checkpointable state (its state_dict is the generator's state)."""

    def __init__(self, generator):
        self.generator = generator

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"])


class TrainingRun:
    """One training run in folder `out`: accelerate's state (one process or several; a GPU or the CPU; the
    networks under autocast in `precision`, devices.PRECISIONS), the checkpoints and the resume.

    `networks` and `states` name what a checkpoint holds (weights as safetensors; optimizer, EMA and other
    states with torch.save, read back with weights_only). A resumed run reads the newest intact checkpoint
    at once (`saved`: its state.json), so that the trainer can see what the run was made with before it
    builds anything; `restore` then loads it into the objects built and returns the step to start from.
    A run without a folder (out=None) keeps no checkpoints.
    """

    def __init__(self, out, *, networks, states, precision="fp32", resume=False, keep=2):
        self.out = None if out is None else Path(out)
        self.networks, self.states, self.keep = tuple(networks), tuple(states), keep
        if self.out is not None and not resume and latest_checkpoint(self.out):
            raise FacegenError(f"{self.out} already holds checkpoints; add --resume to continue it, or choose a "
                               "new --out")
        # cpu=True on machines without a GPU: then processes started by `accelerate launch` or torchrun train
        # together over gloo (accelerate's own --cpu launcher starts several only through MPI).
        on_gpu = torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=accelerate_precision(precision, "cuda" if on_gpu else "cpu"),
                                       cpu=not on_gpu)
        self.precision = "fp32" if self.accelerator.mixed_precision == "no" else self.accelerator.mixed_precision
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        if not self.is_main:  # one process speaks for all: the others say only what goes wrong
            logging.getLogger("facegen_cli").setLevel(logging.WARNING)
        self.checkpoint = newest_intact_checkpoint(self.out, self.networks, self.states) \
            if resume and self.out is not None else None
        self.saved = self.checkpoint[1][0] if self.checkpoint else None


    def restore(self, objects, identity):
        """Load the checkpoint read at the start, if any, into `objects` ({name: network or state}) after
        checking that it was made with the same `identity` (preset, model shape, ...); returns its step
        (0 for a new run)."""
        if self.checkpoint is None:
            return 0
        path, (saved, networks, states) = self.checkpoint
        check_same_run(path, saved, identity)
        for name, weights in {**networks, **states}.items():
            objects[name].load_state_dict(weights)
        log.info(f"resuming from {path} at step {saved['step']}")
        return saved["step"]

    def autocast(self):
        return self.accelerator.autocast()

    def step(self, loss, optimizer, parameters=None, clip=None):
        """One optimizer step on `loss`: gradients from this loss alone, clipped to norm `clip`."""
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if clip:
            self.accelerator.clip_grad_norm_(parameters, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save(self, step, objects, run_state):
        """A checkpoint of `objects` ({name: network or state}, the names given at the start) with
        `run_state` and the step in state.json, written by the main process; the others wait for it."""
        if self.out is not None and self.is_main:
            unwrap = lambda obj: self.accelerator.unwrap_model(obj, keep_torch_compile=False)  # noqa: E731
            save_checkpoint(self.out, step, {name: unwrap(objects[name]).state_dict() for name in self.networks},
                            {name: objects[name].state_dict() for name in self.states}, run_state, self.keep)
        self.accelerator.wait_for_everyone()

    def append_log(self, record):
        """One line of RUN/log.jsonl (main process only)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
