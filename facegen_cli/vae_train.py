"""Training facegen's own f8 AutoencoderKL (`facegen vae train`): no pretrained VAE or perceptual network
is reachable offline, so the project trains its autoencoder itself.

Loss, as in the Stable Diffusion autoencoder's recipe without its LPIPS half:
    L1 + Laplacian-pyramid L1 (edges at every scale) + kl_weight * KL
    + (after --disc-start steps) lambda * hinge loss of a PatchGAN discriminator,
where lambda = disc_weight * |grad rec| / |grad GAN| at the decoder's last layer (taming-transformers'
adaptive weight), so the adversarial term sharpens hair, eyes and teeth without outweighing the
reconstruction. The network is convolutional: training on random crops costs less per step and still
learns whole faces.

`--init VAE --decoder-only` fine-tunes the decoder of a trained autoencoder and leaves its encoder, and so
its latent space, as it was: a DiT trained on that encoder's latents keeps working with the new decoder
(`facegen export --vae` swaps it into a model folder).

    OUT/checkpoints/step-N/  vae.safetensors, discriminator.safetensors, optimizer.pt, disc_optimizer.pt,
                             state.json (runs.py; resumable)
    OUT/samples/step-N.png   held-out faces (top) and their reconstructions (bottom)
    OUT/vae/          the finished autoencoder (save_pretrained layout)
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from .data import image_grid, load_images_and_labels, to_tensor
from .errors import FacegenError
from .files import atomic_dir, save_image
from .flow import laplacian_loss
from .runs import (AUGMENT_STREAM, batch_indices, check_same_run, newest_intact_checkpoint, save_checkpoint,
                   scheduled_lr, seeded_generator)
from .vae import build_vae, load_vae, psnr

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

    def forward(self, images):
        return self.layers(images)


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


def train_vae(data_dir, out, steps=4000, batch_size=16, learning_rate=1e-3, kl_weight=1e-6, image_size=128,
              crop_size=128, size="compact", disc_start=None, disc_weight=0.5, precision="no", resume=False,
              seed=0, checkpoint_every=250, init=None, decoder_only=False, disc_warmup=0, log=print, progress=None):
    """Train an f8 AutoencoderKL of a named size on a labelled data set; OUT/vae is the result.

    disc_start: the step at which the patch discriminator starts learning (None: never).
    disc_warmup: steps it learns alone before its loss reaches the autoencoder. An untrained
        discriminator's gradient, scaled up by the adaptive weight, is noise that blurs a trained decoder.
    init: an autoencoder (folder or hub id) to start from instead of a new one of `size`.
    decoder_only: train the decoder alone (needs init); the encoder and its latents stay as they are.
    Returns the held-out PSNR in dB (on whole images).
    """
    if decoder_only and init is None:
        raise FacegenError("--decoder-only fine-tunes an existing autoencoder: give it with --init")
    if init is None and size not in VAE_SIZES:
        raise FacegenError(f"unknown VAE size {size!r}; use {' or '.join(VAE_SIZES)}")
    if precision not in ("no", "bf16"):
        raise FacegenError(f"unknown precision {precision!r}; use no or bf16")
    out = Path(out)
    if any((out / "checkpoints").glob("step-*")) and not resume:
        raise FacegenError(f"{out} already holds a VAE checkpoint; add --resume to continue it, or choose a new --out")
    train_images = load_images_and_labels(data_dir, "train", image_size)[0]
    held_out = to_tensor(load_images_and_labels(data_dir, "valid", image_size)[0][:256])
    if init is None:
        what = f"a {size} VAE"
    else:
        what = f"the decoder of {init}" if decoder_only else str(init)
    log(f"training {what} on {len(train_images)} images, validating on {len(held_out)}")

    torch.manual_seed(seed)
    vae = build_vae(**VAE_SIZES[size]) if init is None else load_vae(init).requires_grad_(True)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    discriminator = PatchDiscriminator()
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.9),
                                       weight_decay=0.0)
    run_state = {"size": size if init is None else str(init), "seed": seed, "decoder_only": decoder_only}
    start = 0
    checkpoint = newest_intact_checkpoint(out, ("vae", "discriminator"), ("optimizer", "disc_optimizer"), log) \
        if resume else None
    if checkpoint:
        path, (saved, networks, states) = checkpoint
        check_same_run(path, saved, run_state)
        vae.load_state_dict(networks["vae"])
        discriminator.load_state_dict(networks["discriminator"])
        optimizer.load_state_dict(states["optimizer"])
        disc_optimizer.load_state_dict(states["disc_optimizer"])
        start = saved["step"]
        log(f"resuming the VAE at step {start}")
    vae.train()
    last_layer = vae.decoder.conv_out.weight
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def evaluate():
        vae.eval()
        with torch.inference_mode():
            reconstructions = torch.cat([vae(chunk).sample.float() for chunk in held_out.split(32)])
        vae.train()
        return psnr(reconstructions, held_out), reconstructions[:8]

    task = progress.add_task("training VAE", total=steps, completed=start, loss=float("nan")) if progress else None
    for step in range(start, steps):
        generator = seeded_generator(seed, AUGMENT_STREAM, step)
        x = to_tensor(train_images[batch_indices(len(train_images), batch_size, step, seed).numpy()])
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = random_crops(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), crop_size, generator)
        for group in (*optimizer.param_groups, *disc_optimizer.param_groups):
            group["lr"] = scheduled_lr(step, learning_rate, WARMUP_STEPS, steps, cooldown_steps=steps)
        adversarial = disc_start is not None and step >= disc_start
        gan_term = adversarial and step >= disc_start + disc_warmup
        with autocast:
            with torch.set_grad_enabled(not decoder_only):
                posterior = vae.encode(x).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(latents).sample.float()
            rec_loss = F.l1_loss(reconstruction, x) + laplacian_loss(reconstruction, x, levels=4).mean()
            loss = rec_loss + kl_weight * posterior.kl().mean()
            if gan_term:
                gen_loss = -discriminator(reconstruction).float().mean()
                loss = loss + disc_weight * adaptive_weight(rec_loss, gen_loss, last_layer) * gen_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if adversarial:  # hinge loss: real patches above +1, reconstructed ones below -1
            with autocast:
                disc_loss = F.relu(1 - discriminator(x)).mean() + F.relu(1 + discriminator(reconstruction.detach())).mean()
            disc_optimizer.zero_grad(set_to_none=True)  # drop what the generator's loss left there
            disc_loss.backward()
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
        if progress:
            progress.update(task, completed=step + 1, loss=rec_loss.item())
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            value, reconstructions = evaluate()
            save_image(comparison_grid(held_out[:8], reconstructions), out / "samples" / f"step-{step + 1:06d}.png")
            save_checkpoint(out, step + 1, {"vae": vae.state_dict(), "discriminator": discriminator.state_dict()},
                            {"optimizer": optimizer.state_dict(), "disc_optimizer": disc_optimizer.state_dict()},
                            {**run_state, "psnr": value}, keep=2)
            log(f"step {step + 1}: held-out PSNR {value:.2f} dB")
    value, _ = evaluate()
    with atomic_dir(out / "vae") as tmp:
        vae.eval().save_pretrained(tmp)
    log(f"VAE held-out PSNR {value:.2f} dB")
    return value


def evaluate_vae(vae_source, data_dir, split="test", grid=None, columns=8, batch_size=32):
    """Held-out PSNR (dB, mean over faces) of an autoencoder on a split of a labelled folder; with `grid`,
    also writes its first `columns` faces (top) above their reconstructions (bottom). Returns (psnr, faces)."""
    vae = load_vae(vae_source)
    images = to_tensor(load_images_and_labels(data_dir, split, 128)[0])
    with torch.inference_mode():
        reconstructions = torch.cat([vae(chunk).sample.float().clamp(-1, 1) for chunk in images.split(batch_size)])
    if grid is not None:
        save_image(comparison_grid(images[:columns], reconstructions[:columns]), grid)
    return psnr(reconstructions, images), len(images)
