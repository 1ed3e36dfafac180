"""Training: a LatentDiT on a latent cache with the rectified-flow objective, on accelerate.

    RUN/latents/                  the latent cache, when training started from images
    RUN/checkpoints/step-NNNNNN/  model.safetensors, ema.pt, optimizer.pt, state.json (runs.py)
    RUN/samples/step-NNNNNN.png   sample grids (EMA weights)
    RUN/model/                    the usable model (EMA weights), refreshed at each checkpoint

Every random choice of step s (the batch, the noise, the times, the label dropout) comes from a
generator seeded by (seed, s, rank), so `--resume` continues bit for bit where a run stopped.
One process, one GPU, or many with `accelerate launch -m facegen_cli.cli train ...`.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from PIL import Image

from . import flow
from .cache import encode_dataset, is_cache, load_cache
from .config import ModelInfo
from .data import image_grid, to_uint8
from .errors import FacegenError
from .files import save_image
from .model import LatentDiT
from .pipeline import FacegenPipeline
from .runs import (ORDER_STREAM, STEP_STREAM, batch_indices, check_same_run, latest_checkpoint,
                   newest_intact_checkpoint, save_checkpoint, scheduled_lr, seeded_generator)
from .vae import DEFAULT_VAE, load_vae, vae_fingerprint


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


def append_log(out, record):
    """One line of RUN/log.jsonl: the step, the loss (mean over processes), the learning rate, the speed."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def prepare_latents(data, out, vae_source, image_size, log, progress):
    """Open a latent cache, or encode an image data set into RUN/latents first (resumably)."""
    if is_cache(data):
        latents, labels, meta = load_cache(data)
        if vae_source and vae_fingerprint(load_vae(vae_source)) != meta["vae_fingerprint"]:
            raise FacegenError(f"{data} was encoded with the VAE {meta['vae_source']}, not {vae_source}")
        return latents, labels, meta
    source = vae_source or DEFAULT_VAE
    log(f"encoding {data} with the VAE {source} into {Path(out) / 'latents'}")
    encode_dataset(data, source, Path(out) / "latents", image_size, progress=progress, log=log)
    return load_cache(Path(out) / "latents")


CHECKPOINT_NETWORKS, CHECKPOINT_STATES = ("model",), ("ema", "optimizer")


def load_checkpoint(path, contents, model, ema, optimizer, state):
    """Put a read checkpoint's weights into the model, EMA and optimizer; returns its step."""
    saved, networks, states = contents
    check_same_run(path, saved, {key: state[key] for key in ("preset", "model_config", "attributes")})
    model.load_state_dict(networks["model"])
    ema.load_state_dict(states["ema"])
    optimizer.load_state_dict(states["optimizer"])
    return saved["step"]


def load_init_model(path, model_config, cache_meta):
    """An existing model folder to fine-tune from: it must match the preset, vocabulary and VAE."""
    base = FacegenPipeline.load(path)
    base_config = {key: base.dit.config[key] for key in model_config}
    base_config["attributes"] = list(base_config["attributes"])
    different = [f"{key} {base_config[key]} vs {model_config[key]}"
                 for key in model_config if base_config[key] != model_config[key]]
    if different:
        raise FacegenError(f"--init-from {path} does not match this run's preset and data: {'; '.join(different)}")
    if vae_fingerprint(base.vae) != cache_meta["vae_fingerprint"]:
        raise FacegenError(f"--init-from {path} decodes with another VAE than the one that encoded the "
                           f"latents ({cache_meta['vae_source']})")
    return base


def export_model(model, ema, vae, info, out):
    """Write RUN/model with the EMA weights."""
    ema_model = LatentDiT.from_config(model.config)
    ema.copy_to(ema_model.parameters())
    return FacegenPipeline(ema_model, vae, info).save(Path(out) / "model")


def sample_grid(model, ema, vae, info, path, step):
    """One face per attribute asked for alone, plus an unconditional one, from fixed seeds."""
    ema_model = LatentDiT.from_config(model.config)
    ema.copy_to(ema_model.parameters())
    pipe = FacegenPipeline(ema_model.to(model.device).eval(), vae, info)
    num_attributes = len(pipe.attributes)
    y = torch.cat([torch.zeros(1, num_attributes), torch.eye(num_attributes)])
    images = pipe.generate(y, seeds=list(range(len(y))))
    grid = image_grid(to_uint8(images), int(math.ceil(len(y) ** 0.5)))
    save_image(Image.fromarray(grid), path, {"facegen": {"step": step}})


def train(preset, data, out, vae_source=None, max_steps=None, batch_size=None, resume=False,
          log=print, progress=None, cooldown_steps=None, init_from=None, compile=None):
    """Train `preset` on `data` (a latent cache or a labelled image folder) into run folder `out`.

    `init_from` (a model folder) starts the DiT and its EMA from that model's weights and latent
    statistics instead of from scratch (fine-tuning); the optimizer starts afresh, with warmup.
    `compile`: torch.compile the model (None: on GPUs, where it pays, not on CPUs, where compiling
    costs more than it saves).

    Returns the path of the exported model folder (None in the other processes of a multi-process run).
    """
    cfg = preset.train
    max_steps = max_steps or cfg.max_steps
    batch_size = batch_size or cfg.batch_size
    cooldown_steps = cfg.cooldown_steps if cooldown_steps is None else cooldown_steps
    out = Path(out)
    if not resume and latest_checkpoint(out):
        raise FacegenError(f"{out} already holds checkpoints; add --resume to continue it, or choose a new --out")
    # cpu=True on machines without a GPU: then processes started by `accelerate launch` or torchrun train
    # together over gloo (accelerate's own --cpu launcher starts several only through MPI).
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if not accelerator.is_main_process:  # one process speaks for all
        log, progress = (lambda message: None), None
    rank, world_size = accelerator.process_index, accelerator.num_processes

    latents, labels, cache_meta = prepare_latents(data, out, vae_source, preset.image_size, log, progress)
    model_config = {**preset.model, "attributes": cache_meta["attributes"]}
    expected = [model_config["latent_channels"], model_config["latent_size"], model_config["latent_size"]]
    if list(latents.shape[1:]) != expected:
        raise FacegenError(f"the latents have shape {list(latents.shape[1:])} but preset {preset.name} "
                           f"expects {expected}")
    info = ModelInfo(preset=preset.name, image_size=cache_meta["image_size"], latent_mean=cache_meta["latent_mean"],
                     latent_std=cache_meta["latent_std"], vae_source=cache_meta["vae_source"], sample=preset.sample)
    state = {"preset": preset.name, "model_config": model_config, "attributes": cache_meta["attributes"]}
    init = None  # the model this run fine-tunes, if any: where from, its steps, its latent statistics
    init_weights = None  # its DiT weights, when this run starts from it rather than from a checkpoint
    checkpoint = newest_intact_checkpoint(out, CHECKPOINT_NETWORKS, CHECKPOINT_STATES, log) if resume else None
    if checkpoint:  # a fine-tuning run resumes from its own checkpoints
        init = checkpoint[1][0].get("init")
    elif init_from:
        base = load_init_model(init_from, model_config, cache_meta)
        init_weights = base.dit.state_dict()
        # The VAE is the init model's (checked above), so its record of where that VAE came from carries over.
        init = {"source": str(init_from), "trained_steps": base.info.trained_steps or 0,
                "latent_mean": base.info.latent_mean, "latent_std": base.info.latent_std,
                "vae_source": base.info.vae_source, "decoder_source": base.info.decoder_source}
    if init:
        state["init"] = init
        info = dataclasses.replace(info, latent_mean=init["latent_mean"], latent_std=init["latent_std"],
                                   init_from=init["source"], vae_source=init.get("vae_source") or info.vae_source,
                                   decoder_source=init.get("decoder_source"))
    mean = torch.tensor(info.latent_mean).view(1, -1, 1, 1)
    std = torch.tensor(info.latent_std).view(1, -1, 1, 1)
    latents = (latents - mean) / std
    vae = load_vae(cache_meta["vae_source"], accelerator.device)
    if vae_fingerprint(vae) != cache_meta["vae_fingerprint"]:  # the exported model would decode other latents
        raise FacegenError(f"the VAE {cache_meta['vae_source']} has changed since the latents were encoded; "
                           "encode them again (facegen encode) or restore that VAE")

    torch.manual_seed(cfg.seed)
    model = LatentDiT(**model_config)
    if init_weights is not None:
        model.load_state_dict(init_weights)
        log(f"starting from {init['source']} (trained {init['trained_steps']} steps)")
    on_gpu = accelerator.device.type == "cuda"
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    # Fused AdamW (one pass over each tensor) on GPUs and CPUs alike: on 2 CPU cores it steps 287M
    # parameters in 0.1 s instead of the per-tensor loop's 0.3 s.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=True)
    start_step = 0
    if checkpoint:
        start_step = load_checkpoint(*checkpoint, model, ema, optimizer, state)
        log(f"resuming from {checkpoint[0]} at step {start_step}")
    steps_before = init["trained_steps"] if init else 0
    compiled = on_gpu if compile is None else compile
    if compiled:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    num_params = sum(p.numel() for p in model.parameters())
    cooldown = f" (learning rate decaying to 0 over the last {cooldown_steps})" if cooldown_steps else ""
    log(f"training {preset.name} ({num_params / 1e6:.2f}M parameters) on {len(latents)} latents, "
        f"batch {batch_size}, steps {start_step}..{max_steps}{cooldown}, device {accelerator.device}"
        + (f" x {world_size} processes" if world_size > 1 else "") + ", "
        f"precision {cfg.mixed_precision}" + (", compiled" if compiled else ""))

    task = progress.add_task("training", total=max_steps, completed=start_step, loss=float("nan"), speed=0.0) \
        if progress and accelerator.is_main_process else None
    boosts = rare_boosts(labels, cfg.rare_rate) if cfg.rare_rate else None
    weights = sampling_weights(labels, boosts) if cfg.rare_rate else None
    if weights is not None:
        shown = ((labels > 0).float() * weights[:, None]).sum(0) / weights.sum()
        log("oversampling rare attributes: " + ", ".join(
            f"{a} {100 * f:.1f}% -> {100 * g:.1f}%" for a, f, g in zip(cache_meta["attributes"],
                                                                        (labels > 0).float().mean(0), shown)
            if f < cfg.rare_rate))
    # The cache goes to the device once, after the sampling weights were made from its labels: those stay
    # on the CPU with the generator that draws batches from them.
    if latents.nbytes < device_memory(accelerator.device) / 8:  # 26k faces' latents are ~100 MB
        latents, labels = latents.to(accelerator.device), labels.to(accelerator.device)
    if weights is not None:
        boosts, drawn_weights = boosts.to(accelerator.device), weights.to(latents.device)
    tick, images_since_tick = time.perf_counter(), 0
    for step in range(start_step, max_steps):
        generator = seeded_generator(cfg.seed, STEP_STREAM, step, rank, device=accelerator.device)
        if weights is None:
            index = batch_indices(len(labels), batch_size, step, cfg.seed, rank, world_size)
        else:
            index = balanced_batch_indices(weights, batch_size, step, cfg.seed, rank, world_size)
        index = index.to(latents.device)
        x0 = latents[index].to(accelerator.device)
        y = drop_labels(labels[index].to(accelerator.device), generator, cfg.attribute_dropout, cfg.condition_dropout,
                        cfg.uniform_dropout)
        loss_weights = None if weights is None else \
            free_branch_weights(y, drawn_weights[index].to(accelerator.device), boosts)
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(step, cfg.learning_rate, cfg.warmup_steps, max_steps, cooldown_steps)
        with accelerator.autocast():
            loss, parts = flow.flow_loss(model, x0, y, generator, cfg.laplacian_weight, cfg.t_mean, cfg.t_std,
                                         loss_weights)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        images_since_tick += len(index) * world_size

        done = step + 1
        if done % cfg.log_every == 0 or done == max_steps:  # the only host syncs between checkpoints
            mean_loss = accelerator.reduce(loss.detach(), "mean").item()  # over the processes
            now = time.perf_counter()
            speed = images_since_tick / (now - tick)  # images per second, all processes together
            tick, images_since_tick = now, 0
            if accelerator.is_main_process:
                append_log(out, {"step": done, "loss": round(mean_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                                 "images_per_s": round(speed, 1)})
                if task is not None:
                    progress.update(task, completed=done, loss=mean_loss, speed=speed)
        sampling = cfg.sample_every and done % cfg.sample_every == 0
        checkpointing = done % cfg.checkpoint_every == 0 or done == max_steps
        if sampling or checkpointing:
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
                if sampling:
                    sample_grid(unwrapped, ema, vae, info, out / "samples" / f"step-{done:06d}.png", done)
                if checkpointing:
                    save_checkpoint(out, done, {"model": unwrapped.state_dict()},
                                    {"ema": ema.state_dict(), "optimizer": optimizer.state_dict()}, state,
                                    cfg.keep_checkpoints)
                    export_model(unwrapped, ema, vae, dataclasses.replace(info, trained_steps=steps_before + done),
                                 out)
            accelerator.wait_for_everyone()
    if start_step >= max_steps:
        log(f"{out} is already trained to step {start_step}")
    return out / "model" if accelerator.is_main_process else None
