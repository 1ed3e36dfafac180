"""Distillation: a student that samples in one model call per step and in a few steps.

The teacher is a model folder (its DiT guided as `facegen generate` guides it, guidance.composed: two or
three calls per step, 25 calls over 13 Heun steps). The student starts as a copy of the teacher's DiT with
two embeddings more (model.LatentDiT distilled=True), both zero at the start:

- the guidance (Meng et al. 2023; FLUX-dev's guidance embedding): the asked attributes' scale, the drawn
  ones' scale and which attributes are asked. On the *base* rows of a batch the student, at step size 0,
  regresses the teacher's guided velocity v_0 + drawn_scale (v_drawn - v_0) + scale (v_y - v_drawn), so that
  guidance costs one call;
- the step size d (shortcut models, Frans et al. 2024): on the *shortcut* rows it learns the average
  velocity over a step of d from t to t - d, as two steps of d / 2 of its own (no gradient through them):
  s(x_t, t, d) = (s(x_t, t, d/2) + s(x_t - d/2 s(x_t, t, d/2), t - d/2, d/2)) / 2,
  for d = 1, 1/2, ..., 2^-(levels - 1) at times on the grid of d, the smallest d from two steps of the
  guided velocity itself (d = 0). One network then serves 1, 2, 4, ... steps, and many.

On the *plain* rows it is called without guidance or step and regresses the teacher's plain conditional
velocity for a condition drawn as the teacher was trained (every attribute free with a probability of its
own), which keeps its shared weights a model of the faces. It comes close (0.2% of the velocity's mean
square) but not close enough for edits, whose guidance of up to 9 magnifies the difference (a mustache's
identity median 0.229 instead of the teacher's 0.194): so the model folder keeps the teacher as its DiT, which
edits, inversion and classifier-free guidance call, and the student beside it for sampling.

    RUN/checkpoints/step-NNNNNN/  model.safetensors, ema.pt, optimizer.pt, state.json (runs.py)
    RUN/model/                    the teacher's model folder with the student (EMA weights) in model/student/,
                                  sampling it (sample.distilled, sample.steps); model/dit stays the teacher

Every random choice of step s comes from a generator seeded by (seed, s), so `--resume` continues bit for bit.
"""

import copy
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass

import torch
from diffusers.training_utils import EMAModel

from .cache import load_cache
from .config import Provenance
from .errors import FacegenError
from .files import atomic_dir
from .flow import interpolate, sample_timesteps
from .model import LatentDiT
from .pipeline import FacegenPipeline
from .runs import STEP_STREAM, TrainingRun, scheduled_lr, seeded_generator
from .train import balanced_batch_indices, drop_labels, rare_boosts, sampling_weights
from .vae import vae_fingerprint, weights_fingerprint

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    batch_size: int = 64
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    max_steps: int = 5000
    cooldown_steps: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # the rows of each batch: plain (the teacher's conditional velocity), base (its guided velocity, d = 0);
    # the rest learn steps of d > 0 from the student's own half steps
    plain_share: float = 0.2
    base_share: float = 0.4
    levels: int = 6  # step sizes 1, 1/2, ..., 1/32
    guidance: tuple = (1.0, 6.0)  # the asked attributes' scale, drawn uniformly from this range
    drawn_guidance: tuple = (1.0, 2.0)  # the drawn ones'
    rare_rate: float = 0.15  # as the teacher's fine-tune: the rare attributes on 15% of the rows
    # which attributes a guided row asks (guided_requests): one alone on this share of the rows that ask some
    # and leave the rest free, and rare values first by (frequency)^-rarity_power
    single_share: float = 0.5
    rarity_power: float = 1.0
    few_steps: int = 4  # the exported model's default number of steps
    precision: str = "auto"
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0

    def __post_init__(self):
        if not (0 <= self.plain_share and 0 <= self.base_share and self.plain_share + self.base_share <= 1):
            raise FacegenError("plain_share and base_share must be shares of the batch that add up to at most 1")
        if self.levels < 1 or self.few_steps < 1:
            raise FacegenError("levels and few_steps must be at least 1")
        if not (0 <= self.single_share <= 1 and self.rarity_power >= 0):
            raise FacegenError("single_share must be a share from 0 to 1 and rarity_power at least 0")


def teacher_guided(teacher, x, t, y, drawn, scales):
    """The teacher's guided velocity per row: v_0 + drawn_scale (v_drawn - v_0) + scale (v_y - v_drawn)
    (guidance.composed with per-row scales), one batched forward of three branches."""
    n = len(x)
    v = teacher(torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([y, drawn, torch.zeros_like(y)])).float()
    v_y, v_drawn, v_free = v.chunk(3)
    scale, drawn_scale = (s.view(n, 1, 1, 1) for s in scales.unbind(1))
    return v_free + drawn_scale * (v_drawn - v_free) + scale * (v_y - v_drawn)


def guided_requests(labels, generator, cfg, frequencies=None):
    """(y, drawn, asked, scales) for rows of training labels, as the sampler is asked, a third of the rows each:
    - 1 to 4 attributes asked (one on a share cfg.single_share of these rows), the rest free (`generate
      --no-prior`, and eval's control: one asked alone);
    - nothing free, 0 to 4 attributes asked and the rest drawn (`generate` with the label prior; eval's held
      flips: one flipped, the others held);
    - each attribute free with a probability of the row's own, each kept one asked with another (any split).
    In the first two, a row asks its attributes in a random order that puts each one first with a weight of
    (frequency of the row's value)^-cfg.rarity_power, `frequencies` (A,) those of the positive values (none,
    or a power of 0: uniformly): a face with a mustache asks for it alone on most of the rows that ask one
    attribute, not on one in A, as users ask for the rare ones and eval's control asks for every value. The
    asked scale and the drawn one uniform in their ranges."""
    n, device = labels.shape[0], labels.device
    kind = torch.randint(0, 3, (n, 1), generator=generator, device=device)
    rarity = torch.ones_like(labels) if frequencies is None else torch.where(
        labels > 0, frequencies, 1 - frequencies).clamp(min=1e-6) ** -cfg.rarity_power
    # a weighted order without replacement (Efraimidis and Spirakis): sort exponential draws of rate `rarity`
    keys = -torch.rand(labels.shape, generator=generator, device=device).log() / rarity
    rank = keys.argsort(1).argsort(1)
    count = torch.where(torch.rand(n, 1, generator=generator, device=device) < cfg.single_share, 1,
                        torch.randint(2, 5, (n, 1), generator=generator, device=device))
    few = rank < count
    some = rank < torch.randint(0, 5, (n, 1), generator=generator, device=device)
    dropped = drop_labels(labels, generator, 0.0, 0.0, uniform=True)
    y = torch.where(kind == 0, labels * few, torch.where(kind == 1, labels, dropped))
    anywhere = torch.rand(labels.shape, generator=generator, device=device) < torch.rand(
        n, 1, generator=generator, device=device)
    asked = (y != 0) & torch.where(kind == 0, True, torch.where(kind == 1, some, anywhere))
    drawn = torch.where(asked, 0.0, y)
    uniform = lambda lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=generator, device=device)  # noqa: E731
    return y, drawn, asked, torch.stack([uniform(cfg.guidance), uniform(cfg.drawn_guidance)], dim=1)


def shortcut_times(n, levels, generator, device):
    """(t, d, half) for n rows: a level k in 0..levels-1 each, d = 2^-k, t a multiple of d in (0, 1], and
    the half step d / 2 that teaches it (0 for the smallest d: the guided velocity itself)."""
    k = torch.randint(0, levels, (n,), generator=generator, device=device)
    d = 0.5 ** k.float()
    j = (torch.rand(n, generator=generator, device=device) * 2.0 ** k).floor() + 1  # 1 .. 2^k
    half = torch.where(k == levels - 1, 0.0, d / 2)
    return j * d, d, half


def distillation_loss(student, teacher, x0, labels, generator, cfg, frequencies=None):
    """The mean squared error of the student's velocities on one batch: plain, base and shortcut rows
    (the module docstring); `frequencies` as guided_requests takes them."""
    n, device = len(x0), x0.device
    n_plain, n_base = round(cfg.plain_share * n), round(cfg.base_share * n)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    y, drawn, asked, scales = guided_requests(labels, generator, cfg, frequencies)
    t_flow = sample_timesteps(n, generator, device=device)
    t_short, d, half = shortcut_times(n, cfg.levels, generator, device)
    t = torch.cat([t_flow[:n_plain + n_base], t_short[n_plain + n_base:]])
    step = torch.cat([torch.zeros(n_plain + n_base, device=device), d[n_plain + n_base:]])
    x_t = interpolate(x0, noise, t)
    plain, base, short = slice(0, n_plain), slice(n_plain, n_plain + n_base), slice(n_plain + n_base, n)
    guided = slice(n_plain, n)

    with torch.no_grad():
        # the plain rows' condition as the teacher was trained: a row's attributes free with a probability of its own
        y_plain = drop_labels(labels[plain], generator, 0.0, 0.1, uniform=True)
        targets = [teacher(x_t[plain], t[plain], y_plain).float(),
                   teacher_guided(teacher, x_t[base], t[base], y[base], drawn[base], scales[base])]
        if short.start < n:
            g = (scales[short], asked[short])
            h, ts, xs = half[short], t[short], x_t[short]
            v1 = student(xs, ts, y[short], guidance=g, step=h).float()
            middle = xs - (d[short] / 2).view(-1, 1, 1, 1) * v1
            v2 = student(middle, ts - d[short] / 2, y[short], guidance=g, step=h).float()
            targets.append((v1 + v2) / 2)
        target = torch.cat(targets)
    predicted = torch.cat([student(x_t[plain], t[plain], y_plain).float(),
                           student(x_t[guided], t[guided], y[guided], guidance=(scales[guided], asked[guided]),
                                   step=step[guided]).float()])
    per_row = ((predicted - target) ** 2).flatten(1).mean(1)
    return per_row.mean(), {name: per_row[rows].mean().item() if rows.stop > rows.start else float("nan")
                            for name, rows in (("plain", plain), ("base", base), ("shortcut", short))}


def student_of(network: LatentDiT):
    """A distilled LatentDiT of the network's shape, uncalibrated (guidance_gain 1), whose every weight is the
    network's: a teacher's (the new embeddings start at zero: it begins as the teacher's plain conditional
    model) or an earlier student's."""
    student = LatentDiT(**network.architecture(), distilled=True, guidance_gain=1.0)
    missing, unexpected = student.load_state_dict(network.state_dict(), strict=False)
    if unexpected or any(not key.startswith(("guidance_embedder.", "step_embedder.")) for key in missing):
        raise FacegenError("the teacher's DiT does not fit a student of its shape")
    return student


def earlier_student(path, teacher_print):
    """(the student, its steps of distillation) of the distilled model folder `path`, whose teacher (its DiT)
    must be `teacher_print` (a Provenance), to go on distilling from."""
    pipe = FacegenPipeline.load(path)
    if pipe.student is None:
        raise FacegenError(f"{path} is not a distilled model; --init-student takes a student of the teacher")
    if pipe.info.distilled_from is None or pipe.info.distilled_from.fingerprint != teacher_print.fingerprint:
        raise FacegenError(f"{path} was not distilled from this teacher ({teacher_print.name})")
    return student_of(pipe.student.float()), pipe.info.distilled_steps or 0  # trained uncalibrated


def distill(teacher_path, data, out, *, cfg: DistillConfig = DistillConfig(), resume=False, init_student=None,
            progress=None):
    """Distil the model folder `teacher_path` on the latent cache `data` (its training faces, encoded by its
    autoencoder) into the run folder `out`; returns out/model, the student's model folder. `init_student`: a
    student model folder of the same teacher to start from (a new recipe continued from an earlier run's
    student) instead of the teacher's DiT."""
    teacher_pipe = FacegenPipeline.load(teacher_path)
    if teacher_pipe.dit.distilled:
        raise FacegenError(f"{teacher_path} is already distilled; distil its teacher")
    latents, labels, meta = load_cache(data)
    if meta.vae_fingerprint != vae_fingerprint(teacher_pipe.vae):
        raise FacegenError(f"{data} was not encoded by {teacher_path}'s autoencoder; encode its training faces "
                           f"with `facegen encode --vae {teacher_path}/vae`")
    if list(meta.attributes) != list(teacher_pipe.attributes):
        raise FacegenError(f"{data}'s attributes are not {teacher_path}'s")
    teacher_print = Provenance.of(teacher_pipe.path, weights_fingerprint(teacher_pipe.dit))
    torch.manual_seed(cfg.seed)
    if init_student is None:
        student, steps_before = student_of(teacher_pipe.dit), 0
    else:
        student, steps_before = earlier_student(init_student, teacher_print)
    identity = {"teacher": teacher_print.fingerprint, "config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in dataclasses.asdict(cfg).items()
                                                     if k not in ("max_steps", "checkpoint_every", "keep_checkpoints",
                                                                  "log_every")}}
    if init_student is not None:
        identity["init_student"] = weights_fingerprint(student)
    run = TrainingRun(out, networks=("model",), states=("ema", "optimizer"), precision=cfg.precision, resume=resume,
                      keep=cfg.keep_checkpoints)
    latents = teacher_pipe.normalize(latents.float())
    teacher = teacher_pipe.dit.to(run.device)
    student = student.to(run.device).train()
    ema = EMAModel(student.parameters(), decay=cfg.ema_decay, foreach=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=0.0, fused=True)
    start_step = run.restore({"model": student, "ema": ema, "optimizer": optimizer}, identity)
    weights = sampling_weights(labels, rare_boosts(labels, cfg.rare_rate)) if cfg.rare_rate else torch.ones(len(labels))
    # each attribute's positive share in the batches as drawn (rare ones boosted)
    frequencies = ((weights[:, None] * (labels > 0)).sum(0) / weights.sum()).to(run.device)
    latents, labels = latents.to(run.device), labels.to(run.device)
    log.info(f"distilling {teacher_path} ({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters) on "
             f"{len(latents)} latents, batch {cfg.batch_size}, steps {start_step}..{cfg.max_steps}, "
             f"device {run.device}, precision {run.precision}")
    task = progress.add_task("distilling", total=cfg.max_steps, completed=start_step, loss=float("nan"), speed=0.0) \
        if progress else None
    tick = time.perf_counter()
    for s in range(start_step, cfg.max_steps):
        generator = seeded_generator(cfg.seed, STEP_STREAM, s, device=run.device)
        index = balanced_batch_indices(weights, cfg.batch_size, s, cfg.seed).to(run.device)
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(s, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.cooldown_steps)
        with run.autocast():
            loss, parts = distillation_loss(student, teacher, latents[index], labels[index].float(), generator, cfg,
                                            frequencies)
        run.step(loss, optimizer, student.parameters(), cfg.grad_clip)
        ema.step(student.parameters())
        done = s + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            now = time.perf_counter()
            speed = cfg.log_every * cfg.batch_size / (now - tick)
            tick = now
            run.append_log({"step": done, "loss": round(loss.item(), 6), **{k: round(v, 6) for k, v in parts.items()},
                            "lr": optimizer.param_groups[0]["lr"], "rows_per_s": round(speed, 1)})
            if task is not None:
                progress.update(task, completed=done, loss=loss.item(), speed=speed)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            run.save(done, {"model": student, "ema": ema, "optimizer": optimizer}, identity)
            export(teacher_pipe, teacher_print, student, ema, out / "model", cfg, steps_before + done)
    return out / "model"


def export(teacher_pipe, teacher_print, student, ema, folder, cfg, distilled_steps):
    """The teacher's model folder (its DiT, autoencoder, label prior, settings and classifier) with the student's
    EMA weights in MODEL/student, all in float16, written at once, sampling `cfg.few_steps` distilled steps by
    default; `teacher_print` the teacher's Provenance, `distilled_steps` all the student's distillation, an
    earlier run's included."""
    averaged = copy.deepcopy(student)
    ema.copy_to(averaged.parameters())
    info = dataclasses.replace(
        teacher_pipe.info, sample=dataclasses.replace(teacher_pipe.sample, steps=cfg.few_steps, method="euler",
                                                      distilled=True),
        distilled_from=teacher_print, distilled_steps=distilled_steps)
    with atomic_dir(folder) as tmp:
        teacher_pipe.replaced(student=averaged.eval(), info=info).write(tmp, torch.float16)
        if teacher_pipe.classifier_path is not None:
            shutil.copytree(teacher_pipe.classifier_path, tmp / "classifier")
