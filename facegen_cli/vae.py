"""The image <-> latent autoencoder: a diffusers AutoencoderKL, from a hub id or a local folder.

Images are float tensors in [-1, 1], shape (B, 3, H, W); latents are the posterior means,
shape (B, 4, H/8, W/8). facegen normalises latents per channel with statistics measured on
the training set (stored beside the latent cache and in the model's facegen.json), rather
than with the VAE's single scaling factor.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .errors import FacegenError, first_line

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


def load_vae(source, device="cpu"):
    """AutoencoderKL from a local folder (save_pretrained layout) or a Hugging Face hub id."""
    source = str(source)
    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise FacegenError(f"{source}: not a diffusers AutoencoderKL folder (no config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(path if path.exists() else source)
    except (OSError, ValueError) as e:
        raise FacegenError(f"cannot load the VAE {source!r}: {first_line(e)}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_fingerprint(vae):
    """A short hash of the VAE's weights, so that latents of two different VAEs never mix."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def encode(vae, images):
    """Images in [-1, 1] -> unnormalised latents (posterior mean, deterministic)."""
    images = images.to(vae.device, vae.dtype)
    return vae.encode(images).latent_dist.mean.float().contiguous()


@torch.inference_mode()
def decode(vae, latents):
    """Unnormalised latents -> images in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Training a compact VAE (the shipped demo's; real users take a pretrained one such as SD's).
# ---------------------------------------------------------------------------------------------

# Few channels per GroupNorm group would make it an instance norm that erases each image's colours
# (16 groups of the 16-channel first block): 4 groups keep 4+ channels per group.
COMPACT_VAE = dict(block_out_channels=(16, 32, 64, 128), layers_per_block=1, norm_num_groups=4)


def build_vae(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16, latent_channels=4):
    """An f8 AutoencoderKL: one downsampling per block after the first (128 px -> 16 x 16 latents)."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
    )


def psnr(reconstruction, target):
    """Peak signal-to-noise ratio in dB of images in [-1, 1], averaged over the batch."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean().item()


def random_crops(images, size, generator):
    """One random size x size crop per image (offsets on the latent grid, multiples of 8)."""
    if size >= images.shape[-1]:
        return images
    offsets = torch.randint(0, (images.shape[-1] - size) // 8 + 1, (len(images), 2), generator=generator) * 8
    return torch.stack([image[:, y:y + size, x:x + size] for image, (y, x) in zip(images, offsets.tolist())])


def train_vae(data_dir, out, steps=4000, batch_size=16, learning_rate=1e-3, kl_weight=1e-6, image_size=128,
              crop_size=128, resume=False, seed=0, checkpoint_every=250, log=print, progress=None):
    """Train build_vae() on a labelled data set; OUT/vae is the result, OUT/checkpoint the resumable state.

    Loss: L1 + Laplacian-pyramid L1 (sharp edges) + kl_weight * KL. The network is convolutional, so
    training on random crops (crop_size < image_size) costs less per step and still learns full faces.
    Returns the held-out PSNR in dB (on whole images).
    """
    from .data import load_images_and_labels, to_tensor
    from .files import atomic_dir
    from .flow import laplacian_loss
    from .train import batch_indices, seeded_generator

    out = Path(out)
    if (out / "checkpoint").exists() and not resume:
        raise FacegenError(f"{out} already holds a VAE checkpoint; add --resume to continue it, or choose a new --out")
    train_images = load_images_and_labels(data_dir, "train", image_size)[0]
    held_out = load_images_and_labels(data_dir, "valid", image_size)[0][:256]
    log(f"training a VAE on {len(train_images)} images, validating on {len(held_out)}")

    torch.manual_seed(seed)
    vae = build_vae(**COMPACT_VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    start = 0
    if resume and (out / "checkpoint" / "state.json").is_file():
        vae = AutoencoderKL.from_pretrained(out / "checkpoint" / "vae")
        optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
        optimizer.load_state_dict(torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True))
        start = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
        log(f"resuming the VAE at step {start}")
    vae.train()

    def evaluate():
        vae.eval()
        with torch.inference_mode():
            x = to_tensor(held_out)
            value = psnr(torch.cat([vae(chunk).sample for chunk in x.split(32)]), x)
        vae.train()
        return value

    task = progress.add_task("training VAE", total=steps, completed=start, loss=float("nan")) if progress else None
    for step in range(start, steps):
        generator = seeded_generator(seed, 2, step)
        x = to_tensor(train_images[batch_indices(len(train_images), batch_size, step, seed).numpy()])
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = random_crops(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), crop_size, generator)
        lr = learning_rate * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        posterior = vae.encode(x).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.l1_loss(reconstruction, x) + laplacian_loss(reconstruction, x, levels=4) \
            + kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress:
            progress.update(task, completed=step + 1, loss=loss.item())
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            with atomic_dir(out / "checkpoint") as tmp:
                vae.save_pretrained(tmp / "vae")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                value = evaluate()
                (tmp / "state.json").write_text(json.dumps({"step": step + 1, "psnr": value}))
            log(f"step {step + 1}: held-out PSNR {value:.2f} dB")
    value = evaluate()
    with atomic_dir(out / "vae") as tmp:
        vae.eval().save_pretrained(tmp)
    log(f"VAE held-out PSNR {value:.2f} dB")
    return value
