"""Where an autoencoder loses the person: dlib's identity distance of held-out faces against bicubic
shrinks of the same faces, the autoencoder's reconstructions, and its decoder fed latents optimised per face.

    python scripts/vae_identity_floor.py data/celeba-aligned --vae facegen_cli/faces/vae

Prints one markdown table (docs/faces-vae/identity-floor.md). Bicubic at 16, 23 and 32 px keeps 768, 1,587
and 3,072 numbers per face, against the 16x16x4 latent's 1,024. The optimised latents start at the
encoder's and follow the pixels' squared error through the frozen decoder (Adam): where they keep the person
better than the encoder's latents, the decoder can draw that face and the encoder is what loses it.
Needs the identity extra. The optimisation is slow on a CPU (about 10 s a step for 40 faces on 2 cores).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from facegen_cli.data import load_images_and_labels
from facegen_cli.images import to_tensor, to_uint8
from facegen_cli.vae import decode, encode, load_vae, psnr
from facegen_cli.vae_train import IdentityReference

SHRINKS = (16, 23, 32)


def bicubic(images, size):
    small = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def optimised_latents(vae, images, start, *, steps, learning_rate=0.03):
    latents = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latents], lr=learning_rate)
    for _ in range(steps):
        loss = (vae.decode(latents).sample - images).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return latents.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an aligned, labelled folder (facegen data align)")
    parser.add_argument("--vae", default="facegen_cli/faces/vae")
    parser.add_argument("--split", default="test")
    parser.add_argument("--faces", type=int, default=200, help="faces measured (three times as many are read: "
                                                                "the rest are the Fréchet distance's reference)")
    parser.add_argument("--optimise", type=int, default=40, help="faces whose latents are optimised")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if args.optimise > args.faces:
        parser.error("--optimise counts some of the --faces measured: at most as many")

    images = to_tensor(load_images_and_labels(args.data, args.split, 128)[0])[:3 * args.faces]
    vae = load_vae(args.vae)
    latents = torch.cat([encode(vae, chunk) for chunk in images.split(50)])
    reconstructions = torch.cat([decode(vae, chunk) for chunk in latents.split(50)])

    print(f"| {args.faces} held-out faces | numbers per face | PSNR (dB) | identity median | share >= 0.6 | Fréchet |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [(f"bicubic at {s} px", 3 * s * s, bicubic(images, s)) for s in SHRINKS]
    rows.append((f"the autoencoder ({args.vae})", latents[0].numel(), reconstructions))
    reference = IdentityReference(to_uint8(images), args.faces)
    for name, numbers, versions in rows:
        f = reference.figures(to_uint8(versions))
        print(f"| {name} | {numbers:,} | {psnr(versions[:args.faces], images[:args.faces]):.2f} | "
              f"{f['identity_median']:.3f} | {f['identity_crossed']:.2f} | {f['frechet']:.4f} |")
    print(f"| the floor: the faces themselves against the other {len(images) - args.faces} | | | 0 | 0 | "
          f"{f['frechet_floor']:.4f} |")

    faces, start = images[:args.optimise], latents[:args.optimise]
    optimised = decode(vae, optimised_latents(vae, faces, start, steps=args.steps))
    print(f"\n| the first {args.optimise} faces, the same decoder | PSNR (dB) | identity median |")
    print("| --- | --- | --- |")
    for name, versions in (("the encoder's latents", reconstructions[:args.optimise]),
                           (f"latents optimised for the pixels, {args.steps} steps", optimised)):
        print(f"| {name} | {psnr(versions, faces):.2f} | {np.median(reference.distances(to_uint8(versions))[0]):.3f} |")


if __name__ == "__main__":
    main()
