"""Training facegen's own f8 AutoencoderKL (`facegen vae train`): no pretrained VAE or perceptual network
is reachable offline, so the project trains its autoencoder itself.

Loss, as in the Stable Diffusion autoencoder's recipe without its LPIPS half:
    L1 + Laplacian-pyramid L1 (edges at every scale) + kl_weight * KL
    + (after --disc-start steps) lambda * (hinge loss of a PatchGAN discriminator
                                            + feature_weight * its feature-matching loss),
where lambda = disc_weight * |grad rec| / |grad GAN| at the decoder's last layer (taming-transformers'
adaptive weight), so the adversarial term sharpens hair, eyes and teeth without outweighing the
reconstruction. The network is convolutional: training on random crops costs less per step and still
learns whole faces.

`--init VAE --decoder-only` fine-tunes the decoder of a trained autoencoder and leaves its encoder, and so
its latent space, as it was: a DiT trained on that encoder's latents keeps working with the new decoder
(`facegen export --vae` swaps it into a model folder). `--init VAE --layers-per-block N` trains a deeper
autoencoder that starts as exactly VAE (vae.deepen_vae), encoder included: its latents drift as it learns,
so a DiT is fine-tuned on them afterwards (`facegen train --init-from MODEL --other-vae`).

    OUT/checkpoints/step-N/  vae.safetensors, discriminator.safetensors, optimizer.pt, disc_optimizer.pt,
                             state.json (runs.py; resumable)
    OUT/samples/step-N.png   held-out faces (top) and their reconstructions (bottom)
    OUT/vae/          the finished autoencoder (save_pretrained layout)
"""

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .data import load_images_and_labels
from .devices import PRECISIONS
from .errors import FacegenError
from .files import atomic_dir, save_image, save_pretrained
from .flow import laplacian_loss
from .images import image_grid, to_tensor, to_uint8
from .runs import AUGMENT_STREAM, TrainingRun, batch_indices, scheduled_lr, seeded_generator
from .vae import build_vae, deepen_vae, load_vae, psnr

log = logging.getLogger(__name__)

# Named autoencoder sizes. Few channels per GroupNorm group would make it an instance norm that erases
# each image's colours (16 groups of a 16-channel block): the compact one keeps 4+ channels per group.
VAE_SIZES = {
    "compact": dict(block_out_channels=(16, 32, 64, 128), layers_per_block=1, norm_num_groups=4),  # built-in faces
    "faces": dict(block_out_channels=(32, 64, 128, 256), layers_per_block=1, norm_num_groups=8),  # real photos
}


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, taming-transformers' NLayerDiscriminator): one real/fake logit per patch."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        modules = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            previous, width = width, channels * min(2 ** i, 8)
            modules += [nn.Conv2d(previous, width, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                        nn.GroupNorm(min(32, width // 4), width), nn.LeakyReLU(0.2)]
        modules.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*modules)

    def features(self, images):
        """The activations after each LeakyReLU, then the logits."""
        found = []
        for layer in self.layers:
            images = layer(images)
            if isinstance(layer, nn.LeakyReLU):
                found.append(images)
        return [*found, images]

    def forward(self, images):
        return self.layers(images)


def feature_matching_loss(discriminator, fake, x):
    """pix2pixHD's feature matching: L1 between the discriminator's activations on the reconstruction (`fake`:
    its discriminator.features) and on the real image x, every layer weighted alike. Unlike the adversarial
    term it asks for this face's texture (these hair strands, this eye), not just any texture a face could
    have."""
    with torch.no_grad():
        real = discriminator.features(x)[:-1]
    return sum(F.l1_loss(f, r) for f, r in zip(fake[:-1], real)) / len(real)


def random_crops(images, size, generator):
    """One random size x size crop per image (offsets on the latent grid, multiples of 8)."""
    if size >= images.shape[-1]:
        return images
    offsets = torch.randint(0, (images.shape[-1] - size) // 8 + 1, (len(images), 2), generator=generator) * 8
    return torch.stack([image[:, y:y + size, x:x + size] for image, (y, x) in zip(images, offsets.tolist())])


def adaptive_weight(reconstruction_loss, generator_loss, last_layer):
    """taming-transformers' balance: the GAN term's gradient at the decoder's last layer scaled to the
    reconstruction term's."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def comparison_grid(originals, reconstructions):
    """uint8 image: originals on the top row, their reconstructions below."""
    pixels = ((torch.cat([originals, reconstructions]).clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return Image.fromarray(image_grid(pixels.permute(0, 2, 3, 1).numpy(), len(originals)))


WARMUP_STEPS = 100


@dataclass(frozen=True)
class VaeTrainConfig:
    """`facegen vae train`'s settings (the CLI's options replace these defaults)."""
    steps: int = 4000
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    image_size: int = 128
    crop_size: int = 128  # random crops of this side (a multiple of 8): cheaper steps, whole faces learnt
    size: str = "compact"  # VAE_SIZES, for a new autoencoder
    disc_start: Optional[int] = None  # the step at which the patch discriminator starts learning (None: never)
    # steps the discriminator learns alone before its loss reaches the autoencoder: an untrained
    # discriminator's gradient, scaled up by the adaptive weight, is noise that blurs a trained decoder
    disc_warmup: int = 0
    disc_weight: float = 0.5
    feature_weight: float = 0.0  # feature_matching_loss beside the adversarial term (both adaptive-weighted)
    precision: str = "fp32"  # devices.PRECISIONS
    seed: int = 0
    checkpoint_every: int = 250
    init: Optional[str] = None  # an autoencoder (folder or hub id) to start from instead of a new one
    decoder_only: bool = False  # train the decoder alone (needs init): the encoder and its latents stay
    layers_per_block: Optional[int] = None  # resnets a block: the size's, or init deepened to it (deepen_vae)

    def __post_init__(self):
        if self.decoder_only and self.init is None:
            raise FacegenError("--decoder-only fine-tunes an existing autoencoder: give it with --init")
        if self.decoder_only and self.layers_per_block is not None:
            raise FacegenError("--layers-per-block deepens the encoder too (AutoencoderKL shares the setting): "
                               "train the whole autoencoder, without --decoder-only")
        if self.layers_per_block is not None and self.layers_per_block < 1:
            raise FacegenError(f"--layers-per-block must be at least 1, not {self.layers_per_block}")
        if self.init is None and self.size not in VAE_SIZES:
            raise FacegenError(f"unknown VAE size {self.size!r}; use {' or '.join(VAE_SIZES)}")
        if self.precision not in PRECISIONS:
            raise FacegenError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        if self.crop_size % 8 or self.crop_size < 8:
            raise FacegenError(f"--crop-size must be a multiple of 8 (the latent grid), not {self.crop_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise FacegenError(f"--learning-rate must be a finite number of at least 0, not {self.learning_rate}")


def build_autoencoder(config):
    """(the autoencoder to train, its trained parameters, a new discriminator)."""
    torch.manual_seed(config.seed)
    depth = {} if config.layers_per_block is None else {"layers_per_block": config.layers_per_block}
    if config.init is None:
        vae = build_vae(**{**VAE_SIZES[config.size], **depth})
    else:
        vae = load_vae(config.init)
        vae = deepen_vae(vae, config.layers_per_block) if depth else vae.requires_grad_(True)
    if config.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    return vae, [p for p in vae.parameters() if p.requires_grad], PatchDiscriminator()


def autoencoder_losses(vae, discriminator, x, generator, config, step, decoder_only):
    """(the autoencoder's loss, its reconstruction part, the reconstruction) of one batch: L1 + Laplacian
    L1 + KL, plus the adaptive-weighted adversarial term once the discriminator has warmed up."""
    with torch.set_grad_enabled(not decoder_only):
        posterior = vae.encode(x).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    reconstruction = vae.decode(latents).sample.float()
    rec_loss = F.l1_loss(reconstruction, x) + laplacian_loss(reconstruction, x, levels=4).mean()
    loss = rec_loss + config.kl_weight * posterior.kl().mean()
    if config.disc_start is not None and step >= config.disc_start + config.disc_warmup:
        fake = discriminator.features(reconstruction)  # one pass: the logits last, for both terms
        gen_loss = -fake[-1].float().mean()
        if config.feature_weight:
            gen_loss = gen_loss + config.feature_weight * feature_matching_loss(discriminator, fake, x)
        loss = loss + config.disc_weight * adaptive_weight(rec_loss, gen_loss, vae.decoder.conv_out.weight) * gen_loss
    return loss, rec_loss, reconstruction


def train_vae(data_dir, out, config=VaeTrainConfig(), *, resume=False, progress=None):
    """Train an f8 AutoencoderKL (VaeTrainConfig) on a labelled data set; OUT/vae is the result.
    Returns the held-out PSNR in dB (on whole images)."""
    out = Path(out)
    run = TrainingRun(out, networks=("vae", "discriminator"), states=("optimizer", "disc_optimizer"),
                      precision=config.precision, resume=resume)
    train_images = load_images_and_labels(data_dir, "train", config.image_size)[0]
    held_out = to_tensor(load_images_and_labels(data_dir, "valid", config.image_size)[0][:256])
    if config.init is None:
        what = f"a {config.size} VAE"
    else:
        what = f"the decoder of {config.init}" if config.decoder_only else str(config.init)
    log.info(f"training {what} on {len(train_images)} images, validating on {len(held_out)}")

    vae, trained, discriminator = build_autoencoder(config)
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.learning_rate, betas=(0.5, 0.9),
                                       weight_decay=0.0)
    objects = {"vae": vae, "discriminator": discriminator, "optimizer": optimizer, "disc_optimizer": disc_optimizer}
    identity = {"size": config.size if config.init is None else str(config.init), "seed": config.seed,
                "decoder_only": config.decoder_only, "layers_per_block": config.layers_per_block}
    start = run.restore(objects, identity)
    vae, discriminator = vae.to(run.device).train(), discriminator.to(run.device)
    optimizer, disc_optimizer = run.accelerator.prepare(optimizer, disc_optimizer)
    objects.update(optimizer=optimizer, disc_optimizer=disc_optimizer)

    def evaluate():
        vae.eval()
        with torch.inference_mode():
            reconstructions = torch.cat([vae(chunk.to(run.device)).sample.float().cpu() for chunk in held_out.split(32)])
        vae.train()
        return psnr(reconstructions, held_out), reconstructions[:8]

    task = progress.add_task("training VAE", total=config.steps, completed=start, loss=float("nan")) \
        if progress else None
    for step in range(start, config.steps):
        generator = seeded_generator(config.seed, AUGMENT_STREAM, step)
        x = to_tensor(train_images[batch_indices(len(train_images), config.batch_size, step, config.seed).numpy()])
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = random_crops(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), config.crop_size, generator).to(run.device)
        for group in (*optimizer.param_groups, *disc_optimizer.param_groups):
            group["lr"] = scheduled_lr(step, config.learning_rate, WARMUP_STEPS, config.steps, cooldown_steps=config.steps)
        with run.autocast():
            loss, rec_loss, reconstruction = autoencoder_losses(vae, discriminator, x, generator, config, step,
                                                                config.decoder_only)
        run.step(loss, optimizer, trained, clip=1.0)
        if config.disc_start is not None and step >= config.disc_start:  # hinge: real above +1, reconstructed below -1
            with run.autocast():
                disc_loss = F.relu(1 - discriminator(x)).mean() + F.relu(1 + discriminator(reconstruction.detach())).mean()
            run.step(disc_loss, disc_optimizer)
        if progress:
            progress.update(task, completed=step + 1, loss=rec_loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            value, reconstructions = evaluate()
            save_image(comparison_grid(held_out[:8], reconstructions), out / "samples" / f"step-{step + 1:06d}.png")
            run.save(step + 1, objects, {**identity, "psnr": value})
            log.info(f"step {step + 1}: held-out PSNR {value:.2f} dB")
    value, _ = evaluate()
    with atomic_dir(out / "vae") as tmp:
        save_pretrained(vae.eval(), tmp)
    log.info(f"VAE held-out PSNR {value:.2f} dB")
    return value


@dataclass(frozen=True)
class VaeReport:
    """An autoencoder measured on held-out faces (`facegen vae eval`). The identity figures, in dlib's
    face-recognition embedding (identity.py), are measured on the first `identity_faces` faces; the other
    faces of the split are the real reference of both Fréchet distances."""
    faces: int
    psnr: float  # dB, mean over the faces
    identity_faces: Optional[int] = None
    identity_median: Optional[float] = None  # dlib distance, face vs its reconstruction (0.6: another person)
    identity_crossed: Optional[float] = None  # the share of reconstructions 0.6 or more from their face
    frechet: Optional[float] = None  # the reconstructions vs the reference
    frechet_floor: Optional[float] = None  # the faces themselves vs the reference: what real faces score

    def to_dict(self):
        return asdict(self)


class IdentityReference:
    """dlib's embeddings of uint8 faces (N, H, W, 3), taken once so that any number of versions of them
    (reconstructions, shrinks) are measured against the same ones: the first `measured` faces (at most half)
    with their boxes, and the rest, the Fréchet distance's reference."""

    def __init__(self, faces, measured=200):
        from .evaluate import frechet_distance
        from .identity import FaceEmbedder, aligned_embeddings

        self.measured = min(measured, len(faces) // 2)
        if self.measured < 2:
            raise FacegenError(f"identity figures need at least 4 faces, not {len(faces)}")
        self.embedder = FaceEmbedder()
        self.real, self.boxes = aligned_embeddings(self.embedder, faces[:self.measured])
        self.reference = torch.from_numpy(aligned_embeddings(self.embedder, faces[self.measured:])[0])
        self.frechet_floor = frechet_distance(torch.from_numpy(self.real), self.reference)  # what real faces score

    def distances(self, versions):
        """(identity distances, embeddings) of versions of the first len(versions) measured faces, each in
        its original's box."""
        from .identity import aligned_embeddings

        count = min(len(versions), self.measured)
        rebuilt, _ = aligned_embeddings(self.embedder, versions[:count], self.boxes[:count])
        return np.linalg.norm(self.real[:count] - rebuilt, axis=1), rebuilt

    def figures(self, reconstructions):
        """VaeReport's identity fields for reconstructions of the measured faces."""
        from .evaluate import frechet_distance

        distances, rebuilt = self.distances(reconstructions)
        return dict(identity_faces=len(distances), identity_median=float(np.median(distances)),
                    identity_crossed=float((distances >= 0.6).mean()),
                    frechet=frechet_distance(torch.from_numpy(rebuilt), self.reference),
                    frechet_floor=self.frechet_floor)


def evaluate_vae(vae_source, data_dir, split="test", grid=None, columns=8, batch_size=32, identity=False,
                 identity_faces=200):
    """An autoencoder's VaeReport on a split of a labelled folder: PSNR on whole faces, and with `identity`
    (the identity extra) dlib's identity distance and Fréchet distance of the reconstructions. With `grid`,
    also writes its first `columns` faces (top) above their reconstructions (bottom)."""
    vae = load_vae(vae_source)
    images = to_tensor(load_images_and_labels(data_dir, split, 128)[0])
    with torch.inference_mode():
        reconstructions = torch.cat([vae(chunk).sample.float().clamp(-1, 1) for chunk in images.split(batch_size)])
    if grid is not None:
        save_image(comparison_grid(images[:columns], reconstructions[:columns]), grid)
    report = VaeReport(faces=len(images), psnr=psnr(reconstructions, images))
    if identity:
        reference = IdentityReference(to_uint8(images), identity_faces)
        report = replace(report, **reference.figures(to_uint8(reconstructions)))
    return report
