"""Post-hoc EMA (Karras et al. 2024, EDM2): choose the length of the weight average after training.

A power-function EMA averages the weights seen up to step T with the profile p(t) = (g + 1) t^g / T^(g + 1),
t in [0, T]: its width relative to T is fixed (std_rel below), so it suits a run whose length is not known in
advance, as a fixed decay does not. Training keeps two of them (relative widths 0.05 and 0.10) and saves
snapshots of both every so often (RUN/ema-snapshots/step-NNNNNN.safetensors, float16). Any other width at
any snapshot's step is then a least-squares combination of the snapshots' profiles, reconstructed without
training again (reconstruct), so the EMA length can be chosen on the figures that matter.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .errors import FacegenError
from .files import atomic_path, save_tensors

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "ema-snapshots"


def relative_std(exponent):
    """The std of the profile t^g on [0, 1] (normalised), relative to its length."""
    g = np.float64(exponent)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def exponent_of(std_rel):
    """The exponent g whose profile has relative std `std_rel`: the largest real root of
    (g + 2)^2 (g + 3) std^2 = g + 1, i.e. g^3 + 7 g^2 + (16 - 1/std^2) g + (12 - 1/std^2) = 0."""
    if not 0 < std_rel < relative_std(0):  # g = 0, the plain average of everything, is the widest
        raise FacegenError(f"EMA length {std_rel:g} is out of range; use a relative width in (0, "
                           f"{relative_std(0):.3f})")
    inv = 1 / std_rel ** 2
    roots = np.roots([1, 7, 16 - inv, 12 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def profile_overlap(t_a, g_a, t_b, g_b):
    """<p_a, p_b>: the integral over t of the product of two power-function profiles ending at steps t_a and
    t_b with exponents g_a and g_b (numpy arrays broadcast together). With T = max(t_a, t_b) and the
    shorter profile ending at s, it is (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (s / T)^g_long / T, g_long being
    the exponent of the profile ending at T."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    longer = np.maximum(t_a, t_b)
    ratio = np.minimum(t_a, t_b) / longer
    g_long = np.where(t_a < t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio ** g_long / longer


def coefficients(steps, exponents, step, exponent):
    """Weights x of the snapshots (their steps and exponents, 1-d arrays) whose combination sum_i x_i p_i is
    closest in L2 to the profile of (step, exponent): the normal equations A x = b, A_ij = <p_i, p_j>,
    b_i = <p_i, p_target>."""
    steps, exponents = np.asarray(steps, dtype=np.float64), np.asarray(exponents, dtype=np.float64)
    a = profile_overlap(steps[:, None], exponents[:, None], steps[None, :], exponents[None, :])
    b = profile_overlap(steps, exponents, step, exponent)
    return np.linalg.lstsq(a, b, rcond=None)[0]


class PowerEMA:
    """Power-function EMAs of a model's parameters at several relative widths (`stds`), updated after each
    optimizer step: at step t (from 1), average <- beta average + (1 - beta) weights with
    beta = (1 - 1/t)^(g + 1), which keeps the average equal to the profile-weighted mean of every step's
    weights. Checkpointable (state_dict) like diffusers' EMAModel."""

    def __init__(self, named_parameters, stds=(0.05, 0.10)):
        named = list(named_parameters)
        self.names = [name for name, _ in named]
        self.stds = tuple(float(s) for s in stds)
        self.exponents = [exponent_of(s) for s in self.stds]
        self.averages = [[p.detach().float().clone() for _, p in named] for _ in self.stds]
        self.steps = 0

    @torch.no_grad()
    def step(self, parameters):
        self.steps += 1
        weights = [p.detach().float() for p in parameters]
        for exponent, average in zip(self.exponents, self.averages):
            beta = (1 - 1 / self.steps) ** (exponent + 1)
            torch._foreach_lerp_(average, weights, 1 - beta)

    def to(self, device):
        self.averages = [[a.to(device) for a in average] for average in self.averages]
        return self

    def state_dict(self):
        return {"steps": self.steps, "stds": list(self.stds), "averages": self.averages}

    def load_state_dict(self, state):
        if tuple(state["stds"]) != self.stds or len(state["averages"][0]) != len(self.names):
            raise FacegenError("the checkpoint's post-hoc EMA was kept at other widths or for another model")
        device = self.averages[0][0].device
        self.steps = int(state["steps"])
        self.averages = [[a.to(device) for a in average] for average in state["averages"]]

    def save_snapshot(self, folder, step):
        """folder/step-NNNNNN.safetensors: each width's average in float16, keyed "{std}/{parameter}"."""
        path = Path(folder) / f"step-{step:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{std}/{name}": a.half().cpu().contiguous()
                   for std, average in zip(self.stds, self.averages) for name, a in zip(self.names, average)}
        with atomic_path(path) as tmp:
            save_tensors(tensors, tmp)
        return path


def snapshots(folder):
    """[(path, step, std)] of every average in the snapshot folder, by step."""
    found = []
    for path in sorted(Path(folder).glob("step-*.safetensors")):
        step = int(path.stem.split("-")[1])
        with safe_open(path, "pt") as f:
            stds = sorted({float(key.split("/", 1)[0]) for key in f.keys()})
        found += [(path, step, std) for std in stds]
    return found


def reconstruct(folder, std_rel, step=None):
    """The weights {parameter: float32 tensor} of a power-function EMA of relative width `std_rel` at `step`
    (default: the newest snapshot's), from the snapshots in `folder` up to that step."""
    found = snapshots(folder)
    if not found:
        raise FacegenError(f"{folder}: no post-hoc EMA snapshots (train with posthoc_ema_every in the preset)")
    step = max(s for _, s, _ in found) if step is None else step
    used = [item for item in found if item[1] <= step]
    if not used or step not in {s for _, s, _ in found}:
        raise FacegenError(f"{folder}: no snapshot at step {step}; the snapshots are at steps "
                           f"{', '.join(str(s) for s in sorted({s for _, s, _ in found}))}")
    weights = coefficients([s for _, s, _ in used], [exponent_of(d) for _, _, d in used], step, exponent_of(std_rel))
    log.info(f"EMA of relative width {std_rel:g} at step {step} from {len(used)} snapshot averages")
    combined = {}
    for (path, _, std), weight in zip(used, weights):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                prefix, name = key.split("/", 1)
                if float(prefix) == std:
                    combined[name] = combined.get(name, 0) + float(weight) * f.get_tensor(key).float()
    return combined

