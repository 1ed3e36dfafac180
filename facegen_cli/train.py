"""Training: a LatentDiT on a latent cache with the rectified-flow objective, on the runs.py skeleton.

    RUN/latents/                  the latent cache, when training started from images
    RUN/checkpoints/step-NNNNNN/  model.safetensors, ema.pt, optimizer.pt, state.json (runs.py)
    RUN/samples/step-NNNNNN.png   sample grids (EMA weights)
    RUN/model/                    the usable model (EMA weights), refreshed at each checkpoint
    RUN/ema-snapshots/            with posthoc_ema_every: the power-function EMAs' snapshots (posthoc_ema.py)

Every random choice of step s (the batch, the noise, the times, the label dropout) comes from a
generator seeded by (seed, s, rank), so `--resume` continues bit for bit where a run stopped.
One process, one GPU, or many with `accelerate launch -m facegen_cli.cli train ...`.
"""

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers.training_utils import EMAModel
from PIL import Image

from . import flow
from .cache import encode_dataset, is_cache, load_cache
from .config import ModelInfo, Preset, Provenance
from .errors import FacegenError
from .files import save_image
from .framing import framing_bank
from .images import image_grid, to_uint8
from .inpainting import region_mask_bank, training_masks
from .label_prior import LabelPrior
from .model import LatentDiT, inpainting_context
from .posthoc_ema import SNAPSHOT_DIR, PowerEMA
from .pipeline import FacegenPipeline
from .runs import ORDER_STREAM, STEP_STREAM, TrainingRun, batch_indices, scheduled_lr, seeded_generator
from .vae import DEFAULT_VAE, load_vae, vae_fingerprint, weights_fingerprint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Batches: rare attributes oversampled, their free-attribute examples weighted back
# ---------------------------------------------------------------------------------------------

def rare_boosts(labels, rare_rate):
    """Per attribute, how much more often its positives are drawn so that they show about `rare_rate`
    of the time: rare_rate / f for an attribute of frequency f < rare_rate, else 1."""
    frequency = (labels > 0).float().mean(0)
    return torch.where((frequency > 0) & (frequency < rare_rate), rare_rate / frequency.clamp(min=1e-12), 1.0)


def sampling_weights(labels, boosts):
    """Per example, the boost of its rarest positive attribute (so that faces with several rare ones are
    not drawn far more often still); 1 for a face with none. Free (0) attributes do not count."""
    return torch.where(labels > 0, boosts, 1.0).amax(1)


def free_branch_weights(y, drawn_weights, boosts):
    """Loss weights that keep oversampling from biasing what the model draws for a free attribute.

    A face drawn `drawn_weights` times as often as its share is, once an attribute that earned it that is
    set free, an over-counted sample of the free-attribute condition (`--male` alone would grow
    mustaches). Weighting it by w(kept labels) / w(all labels) is exact importance weighting: every face
    that matches the kept labels has the same w(kept labels), so within each condition the faces count
    as often as in the data, while conditions that ask for a rare attribute keep their extra examples.
    """
    return sampling_weights(y, boosts) / drawn_weights


def balanced_batch_indices(weights, batch_size, step, seed, rank=0, world_size=1):
    """This process's share of a batch drawn with replacement in proportion to `weights`."""
    batch = torch.multinomial(weights, batch_size, replacement=True, generator=seeded_generator(seed, ORDER_STREAM, step))
    return batch[rank::world_size]


def drop_labels(labels, generator, attribute_dropout, condition_dropout, uniform=False):
    """Set each attribute free (0) with one probability and the whole vector with another. With
    `uniform`, each example's attribute probability is drawn from U(0, 1) instead: every number of asked
    attributes, from none to all, is then about equally common."""
    rate = torch.rand(labels.shape[0], 1, generator=generator, device=labels.device) if uniform else attribute_dropout
    keep = torch.rand(labels.shape, generator=generator, device=labels.device) >= rate
    keep &= torch.rand(labels.shape[0], 1, generator=generator, device=labels.device) >= condition_dropout
    return labels.float() * keep


def device_memory(device):
    """Bytes of free memory on a GPU; on a CPU, all of it counts (the cache is in memory already)."""
    return torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else float("inf")


@dataclass
class TrainingData:
    """The normalised latents and their labels, and how a step's batch is drawn from them."""
    latents: torch.Tensor  # (N, C, h, w)
    labels: torch.Tensor  # (N, A) int8
    boosts: Optional[torch.Tensor] = None  # rare_boosts, with rare_rate
    weights: Optional[torch.Tensor] = None  # sampling_weights, with rare_rate (kept on the CPU)
    inpainting: bool = False  # an inpainting model's batches carry a context (inpainting.py)
    region_masks: Optional[torch.Tensor] = None  # (M, R, h, w) uint8 inpainting.region_mask_bank, or None
    framings: Optional[torch.Tensor] = None  # (N, 3) a framed model's framing.features of each latent's view

    @classmethod
    def build(cls, latents, labels, attributes, cfg, device, inpainting=False, region_masks=None, framings=None):
        data = cls(latents, labels, inpainting=inpainting, region_masks=region_masks, framings=framings)
        if cfg.rare_rate:
            data.boosts = rare_boosts(labels, cfg.rare_rate)
            data.weights = sampling_weights(labels, data.boosts)
            shown = ((labels > 0).float() * data.weights[:, None]).sum(0) / data.weights.sum()
            log.info("oversampling rare attributes: " + ", ".join(
                f"{a} {100 * f:.1f}% -> {100 * g:.1f}%" for a, f, g in zip(attributes, (labels > 0).float().mean(0),
                                                                            shown) if f < cfg.rare_rate))
        # The cache goes to the device once, after the sampling weights were made from its labels: those stay
        # on the CPU with the generator that draws batches from them.
        if latents.nbytes < device_memory(device) / 8:  # 26k faces' latents are ~100 MB
            data.latents, data.labels = latents.to(device), labels.to(device)
        if region_masks is not None:
            data.region_masks = region_masks.to(device)
        if framings is not None:
            data.framings = framings.to(data.latents.device)
        if data.boosts is not None:
            data.boosts = data.boosts.to(device)
        return data

    def batch(self, step, cfg, generator, rank, world_size, device):
        """(x0, y with labels dropped, loss weights or None, the model's other inputs: an inpainting context,
        the views' framings) of this process's share of step `step`."""
        if self.weights is None:
            index = batch_indices(len(self.labels), cfg.batch_size, step, cfg.seed, rank, world_size)
        else:
            index = balanced_batch_indices(self.weights, cfg.batch_size, step, cfg.seed, rank, world_size)
        index = index.to(self.latents.device)
        y = drop_labels(self.labels[index].to(device), generator, cfg.attribute_dropout, cfg.condition_dropout,
                        cfg.uniform_dropout)
        loss_weights = None if self.weights is None else \
            free_branch_weights(y, self.weights.to(self.latents.device)[index].to(device), self.boosts)
        x0 = self.latents[index].to(device)
        inputs = {}
        if self.inpainting:
            inputs["context"] = inpainting_context(x0, training_masks(x0, self.region_masks, cfg.inpaint_rate,
                                                                      generator))
        if self.framings is not None:
            inputs["framing"] = self.framings[index].to(device)
        return x0, y, loss_weights, inputs


# ---------------------------------------------------------------------------------------------
# The run: latents, what it starts from, and the loop
# ---------------------------------------------------------------------------------------------

def prepare_latents(data, out, vae_source, image_size, progress):
    """Open a latent cache, or encode an image data set into RUN/latents first (resumably).
    Returns (latents, labels, CacheMeta, the cache's folder)."""
    if is_cache(data):
        latents, labels, meta = load_cache(data)
        if vae_source:  # the VAE that encoded it, perhaps moved since: the same weights, found elsewhere
            if vae_fingerprint(load_vae(vae_source)) != meta.vae_fingerprint:
                raise FacegenError(f"{data} was encoded with the VAE {meta.vae_source}, not {vae_source}")
            source = Path(vae_source).resolve() if Path(vae_source).exists() else vae_source
            meta = dataclasses.replace(meta, vae_source=str(source))
        elif Path(meta.vae_source).is_absolute() and not Path(meta.vae_source).exists():
            raise FacegenError(f"{data} was encoded with the VAE {meta.vae_source}, which is no longer there; "
                               "give where it is now with --vae")
        return latents, labels, meta, Path(data)
    source = vae_source or DEFAULT_VAE
    log.info(f"encoding {data} with the VAE {source} into {Path(out) / 'latents'}")
    encode_dataset(data, source, Path(out) / "latents", image_size=image_size, progress=progress)
    return *load_cache(Path(out) / "latents"), Path(out) / "latents"


@dataclass
class Init:
    """The model a fine-tuning run starts from (--init-from), as its checkpoints record it."""
    model: Provenance  # its name and its DiT's fingerprint
    trained_steps: int
    latent_mean: list
    latent_std: list
    vae: Optional[Provenance] = None  # its record of where its VAE came from, which carries over
    decoder: Optional[Provenance] = None

    @classmethod
    def from_state(cls, state):
        optional = lambda d: Provenance(**d) if d else None  # noqa: E731
        return cls(Provenance(**state["model"]), state["trained_steps"], state["latent_mean"], state["latent_std"],
                   optional(state.get("vae")), optional(state.get("decoder")))


def load_init_model(path, model_config, cache_meta, other_vae=False):
    """An existing model folder to fine-tune from: (its DiT's weights, its Init). It must match the preset,
    vocabulary and VAE; an inpainting or framed model may start from a plain one (the embedding of what the
    plain one lacks from zero). With `other_vae`, the latents may come from another autoencoder (a retrained
    encoder): only the DiT's weights carry over, and the latents' own statistics and VAE are the new model's."""
    base = FacegenPipeline.load(path)
    base_config = {key: base.dit.config.get(key) for key in model_config}
    base_config["attributes"] = list(base_config["attributes"])
    widened = {key for key in ("context_channels", "framing") if not base_config[key] and model_config[key]}
    different = [f"{key} {base_config[key]} vs {model_config[key]}" for key in model_config
                 if base_config[key] != model_config[key] and key not in widened]
    if different:
        raise FacegenError(f"--init-from {path} does not match this run's preset and data: {'; '.join(different)}")
    model = Provenance.of(base.path, weights_fingerprint(base.dit))
    if other_vae:
        return base.dit.state_dict(), Init(model, base.info.trained_steps or 0, cache_meta.latent_mean,
                                           cache_meta.latent_std)
    if vae_fingerprint(base.vae) != cache_meta.vae_fingerprint:
        raise FacegenError(f"--init-from {path} decodes with another VAE than the one that encoded the "
                           f"latents ({cache_meta.vae_source}); --other-vae fine-tunes it on these latents anyway")
    init = Init(model, base.info.trained_steps or 0, base.info.latent_mean, base.info.latent_std, base.info.vae,
                base.info.decoder)
    return base.dit.state_dict(), init


def model_info(preset, cache_meta, init, vae):
    """The ModelInfo the run exports: the cache's latent statistics and VAE (`vae`, loaded), or the init
    model's."""
    info = ModelInfo(preset=preset.name, image_size=cache_meta.image_size, latent_mean=cache_meta.latent_mean,
                     latent_std=cache_meta.latent_std, sample=preset.sample,
                     vae=Provenance.of(cache_meta.vae_source, vae_fingerprint(vae, encoder_only=True)))
    if init is None:
        return info
    return dataclasses.replace(info, latent_mean=init.latent_mean, latent_std=init.latent_std, init_from=init.model,
                               vae=init.vae or info.vae, decoder=init.decoder)


def ema_pipeline(model, ema, vae, info, prior=None):
    """A pipeline of the EMA weights (what the run exports and samples), with the training set's label prior."""
    ema_model = LatentDiT.from_config(model.config)
    ema.copy_to(ema_model.parameters())
    return FacegenPipeline(ema_model.to(model.device).eval(), vae, info, prior=prior)


def sample_grid(pipe, path, step):
    """One face per attribute asked for alone, plus an unconditional one, from fixed seeds."""
    num_attributes = len(pipe.attributes)
    y = torch.cat([torch.zeros(1, num_attributes), torch.eye(num_attributes)])
    images = pipe.generate(y, seeds=list(range(len(y))))
    grid = image_grid(to_uint8(images), int(math.ceil(len(y) ** 0.5)))
    save_image(Image.fromarray(grid), path, {"facegen": {"step": step}})


def statistics_of(path, vae):
    """The latent statistics {latent_mean, latent_std} of the model folder `path`, refused unless its encoder
    is `vae`'s (the one that encoded this run's latents)."""
    model = FacegenPipeline.load(path)
    if vae_fingerprint(model.vae, encoder_only=True) != vae_fingerprint(vae, encoder_only=True):
        raise FacegenError(f"--latent-stats-from {path}: its autoencoder's encoder is not the one that encoded "
                           "the latents")
    return {"latent_mean": model.info.latent_mean, "latent_std": model.info.latent_std}


def train(preset: Preset, data, out, *, vae_source=None, resume=False, init_from=None, other_vae=False,
          latent_stats_from=None, compile=None, progress=None):
    """Train `preset` (its `train` settings as given: Preset.with_train applies overrides) on `data`, a
    latent cache or a labelled image folder, into the run folder `out`.

    `init_from` (a model folder) starts the DiT and its EMA from that model's weights and latent
    statistics instead of from scratch (fine-tuning); the optimizer starts afresh, with warmup. With
    `other_vae`, the latents may be another autoencoder's (load_init_model).
    `latent_stats_from` (a model folder of the same encoder) normalises the latents with that model's
    statistics instead of the cache's, so that the two models read the same inputs (an autoguidance guide).
    `compile`: torch.compile the model (None: on GPUs, where it pays, not on CPUs, where compiling
    costs more than it saves).

    Returns the path of the exported model folder (None in the other processes of a multi-process run).
    """
    cfg, out = preset.train, Path(out)
    states = ("ema", "optimizer") + (("posthoc_ema",) if cfg.posthoc_ema_every else ())
    run = TrainingRun(out, networks=("model",), states=states, precision=cfg.precision, resume=resume,
                      keep=cfg.keep_checkpoints)
    if not run.is_main:  # one process speaks for all
        progress = None
    latents, labels, cache_meta, cache_dir = prepare_latents(data, out, vae_source, preset.image_size, progress)
    model_config = preset.model.config(cache_meta.attributes)
    expected = [preset.model.latent_channels, preset.model.latent_size, preset.model.latent_size]
    if list(latents.shape[1:]) != expected:
        raise FacegenError(f"the latents have shape {list(latents.shape[1:])} but preset {preset.name} "
                           f"expects {expected}")
    identity = {"preset": preset.name, "model_config": model_config, "attributes": cache_meta.attributes}
    if other_vae and not init_from:
        raise FacegenError("--other-vae says the latents are not --init-from's autoencoder's: give --init-from")
    if init_from and latent_stats_from:
        raise FacegenError("--init-from already sets the latent statistics (the init model's); leave out "
                           "--latent-stats-from")
    vae = load_vae(cache_meta.vae_source, run.device)
    if vae_fingerprint(vae) != cache_meta.vae_fingerprint:  # the exported model would decode other latents
        raise FacegenError(f"the VAE {cache_meta.vae_source} has changed since the latents were encoded; "
                           "encode them again (facegen encode) or restore that VAE")
    init_weights, init, statistics = None, None, None  # a resumed run reads both from its checkpoints
    if run.saved is not None:
        init = Init.from_state(run.saved["init"]) if run.saved.get("init") else None
        statistics = run.saved.get("latent_stats")
    elif init_from:
        init_weights, init = load_init_model(init_from, model_config, cache_meta, other_vae)
    elif latent_stats_from:
        statistics = statistics_of(latent_stats_from, vae)
    info = model_info(preset, cache_meta, init, vae)
    if statistics:
        info = dataclasses.replace(info, **statistics)
    latents = (latents - torch.tensor(info.latent_mean).view(1, -1, 1, 1)) / torch.tensor(info.latent_std).view(
        1, -1, 1, 1)

    torch.manual_seed(cfg.seed)
    model = LatentDiT(**model_config)
    if init_weights is not None:
        missing, _ = model.load_state_dict(init_weights, strict=not (model.inpainting or model.framed))
        lacking = [key for key in missing if not key.startswith(("context_embedder.", "framing_embedder."))]
        if lacking:
            raise FacegenError(f"--init-from {init_from}: its DiT has no {lacking[0]}")
        log.info(f"starting from {init_from} (trained {init.trained_steps} steps)")
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    posthoc = PowerEMA(model.named_parameters()) if cfg.posthoc_ema_every else None
    # Fused AdamW (one pass over each tensor) on GPUs and CPUs alike: on 2 CPU cores it steps 287M
    # parameters in 0.1 s instead of the per-tensor loop's 0.3 s.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=True)
    averages = {"ema": ema, **({"posthoc_ema": posthoc} if posthoc else {})}
    start_step = run.restore({"model": model, "optimizer": optimizer, **averages}, identity)
    compiled = run.device.type == "cuda" if compile is None else compile
    if compiled:
        model = torch.compile(model)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    ema.to(run.device)
    if posthoc:
        posthoc.to(run.device)
    run_state = {**identity, **({"init": dataclasses.asdict(init)} if init else {}),
                 **({"latent_stats": statistics} if statistics else {})}
    log.info(f"training {preset.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
             f"{len(latents)} latents, batch {cfg.batch_size}, steps {start_step}..{cfg.max_steps}"
             + (f" (learning rate decaying to 0 over the last {cfg.cooldown_steps})" if cfg.cooldown_steps else "")
             + f", device {run.device}" + (f" x {run.world_size} processes" if run.world_size > 1 else "")
             + f", precision {run.precision}" + (", compiled" if compiled else ""))
    region_masks = region_mask_bank(cache_dir, preset.image_size, preset.model.latent_size, out) \
        if preset.model.inpainting else None
    framings = framing_bank(cache_dir, preset.image_size) if preset.model.framing else None
    batches = TrainingData.build(latents, labels, cache_meta.attributes, cfg, run.device, preset.model.inpainting,
                                 region_masks, framings)
    loop(run, cfg, model=model, averages=averages, optimizer=optimizer, batches=batches, start_step=start_step,
         progress=progress, vae=vae, info=info, prior=LabelPrior.from_labels(cache_meta.attributes, labels),
         run_state=run_state, steps_before=init.trained_steps if init else 0)
    if start_step >= cfg.max_steps:
        log.info(f"{out} is already trained to step {start_step}")
    return out / "model" if run.is_main else None


def loop(run, cfg, *, model, averages, optimizer, batches, start_step, progress, vae, info, prior, run_state,
         steps_before):
    """The training steps from `start_step` to cfg.max_steps: the loss logged every cfg.log_every steps,
    sample grids, checkpoints, post-hoc EMA snapshots and the exported model (RUN/model, the `averages`'
    "ema", with the label prior `prior`) at their intervals."""
    ema, posthoc = averages["ema"], averages.get("posthoc_ema")
    task = progress.add_task("training", total=cfg.max_steps, completed=start_step, loss=float("nan"), speed=0.0) \
        if progress else None
    tick, images_since_tick = time.perf_counter(), 0
    for step in range(start_step, cfg.max_steps):
        generator = seeded_generator(cfg.seed, STEP_STREAM, step, run.rank, device=run.device)
        x0, y, loss_weights, inputs = batches.batch(step, cfg, generator, run.rank, run.world_size, run.device)
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.cooldown_steps)
        with run.autocast():
            loss, _ = flow.flow_loss(model, x0, y, generator, cfg.laplacian_weight, cfg.t_mean, cfg.t_std, loss_weights,
                                     inputs=inputs)
        run.step(loss, optimizer, model.parameters(), cfg.grad_clip)
        ema.step(model.parameters())
        if posthoc:
            posthoc.step(model.parameters())
        images_since_tick += len(x0) * run.world_size

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:  # the only host syncs between checkpoints
            mean_loss = run.accelerator.reduce(loss.detach(), "mean").item()  # over the processes
            now = time.perf_counter()
            speed = images_since_tick / (now - tick)  # images per second, all processes together
            tick, images_since_tick = now, 0
            run.append_log({"step": done, "loss": round(mean_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                            "images_per_s": round(speed, 1)})
            if task is not None:
                progress.update(task, completed=done, loss=mean_loss, speed=speed)
        if cfg.sample_every and done % cfg.sample_every == 0 and run.is_main:
            sample_grid(ema_pipeline(run.accelerator.unwrap_model(model, keep_torch_compile=False), ema, vae, info),
                        run.out / "samples" / f"step-{done:06d}.png", done)
        if posthoc and run.is_main and (done % cfg.posthoc_ema_every == 0 or done == cfg.max_steps):
            posthoc.save_snapshot(run.out / SNAPSHOT_DIR, done)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            run.save(done, {"model": model, "optimizer": optimizer, **averages}, run_state)
            if run.is_main:
                pipe = ema_pipeline(run.accelerator.unwrap_model(model, keep_torch_compile=False), ema, vae,
                                    dataclasses.replace(info, trained_steps=steps_before + done), prior)
                pipe.save(run.out / "model")
