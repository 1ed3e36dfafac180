"""The image <-> latent autoencoder: a diffusers AutoencoderKL, from a hub id or a local folder.

Images are float tensors in [-1, 1], shape (B, 3, H, W); latents are the posterior means,
shape (B, 4, H/8, W/8). facegen normalises latents per channel with statistics measured on
the training set (stored beside the latent cache and in the model's facegen.json), rather
than with the VAE's single scaling factor.
"""

import hashlib
from pathlib import Path

import torch
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


def weights_fingerprint(module, prefixes=None):
    """A short hash of a network's weights (those whose names start with one of `prefixes`, if given), in
    float32 whatever they are stored in: the same weights give the same fingerprint on every machine."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if prefixes and not name.startswith(prefixes):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def vae_fingerprint(vae, encoder_only=False):
    """The VAE's weights_fingerprint, so that latents of two different VAEs never mix. With encoder_only,
    of the part that makes the latents (encoder and quant_conv): two autoencoders with the same encoder
    fingerprint share a latent space, whatever their decoders."""
    return weights_fingerprint(vae, ("encoder.", "quant_conv.") if encoder_only else None)


@torch.inference_mode()
def encode(vae, images):
    """Images in [-1, 1] -> unnormalised latents (posterior mean, deterministic)."""
    images = images.to(vae.device, vae.dtype)
    return vae.encode(images).latent_dist.mean.float().contiguous()


@torch.inference_mode()
def decode(vae, latents):
    """Unnormalised latents -> images in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


def build_vae(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16, latent_channels=4):
    """An f8 AutoencoderKL: one downsampling per block after the first (128 px -> 16 x 16 latents)."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
    )


def deepen_vae(vae, layers_per_block):
    """`vae` with `layers_per_block` resnets in every encoder block (and, as AutoencoderKL builds it, one more
    in every decoder block). The new resnets follow the old ones with their last convolution zero, so each
    starts as the identity and the deeper autoencoder starts as exactly `vae`: capacity added, nothing it
    learnt lost. The encoder deepens with the decoder (AutoencoderKL shares the setting), so its weights'
    fingerprint changes even where its latents do not."""
    old = vae.config.layers_per_block
    if layers_per_block < old:
        raise FacegenError(f"the autoencoder has {old} resnets a block; it can be deepened, not made shallower "
                           f"({layers_per_block})")
    deeper = AutoencoderKL.from_config({**vae.config, "layers_per_block": layers_per_block})
    missing, unexpected = deeper.load_state_dict(vae.state_dict(), strict=False)
    new = [f"encoder.down_blocks.{b}.resnets.{r}." for b in range(len(deeper.encoder.down_blocks))
           for r in range(old, layers_per_block)]
    new += [f"decoder.up_blocks.{b}.resnets.{r}." for b in range(len(deeper.decoder.up_blocks))
            for r in range(old + 1, layers_per_block + 1)]
    if unexpected or any(not key.startswith(tuple(new)) for key in missing):
        raise FacegenError(f"cannot deepen this autoencoder: its weights do not fit ({(unexpected or missing)[0]})")
    with torch.no_grad():
        for name, module in deeper.named_modules():
            if name.endswith("conv2") and f"{name.rsplit('.', 1)[0]}." in new:
                module.weight.zero_()
                module.bias.zero_()
    return deeper.to(vae.device).train(vae.training)


def psnr(reconstruction, target):
    """Peak signal-to-noise ratio in dB of images in [-1, 1], averaged over the batch."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean().item()
