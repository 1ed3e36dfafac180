"""What an inpainting model is trained on: masks of the regions edits repaint, drawn from each face's own
landmarks exactly as `facegen edit` draws them (edit.region_mask -> pipeline.latent_mask), and random boxes.

Each training example is, with probability `inpaint_rate`, given one of these masks and the clean latent
outside it (model.inpainting_context); the rest are drawn whole (nothing known), so that one network serves
generation and inpainting.
"""

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from .cache import cache_image_paths, read_meta
from .edit import region_mask
from .edit_request import EditRequest
from .files import atomic_path, save_tensors
from .layout import read_landmarks
from .pipeline import latent_mask

log = logging.getLogger(__name__)

# The regions of every edit kind, one mask each (hair colours share one region, bald and a hat another).
TRAINING_REGIONS = ("mustache", "beard", "eyeglasses", "smiling", "bangs", "wearing_hat", "bald", "black_hair",
                    "pale_skin", "male")
MASK_FILE = "region-masks.safetensors"
BANK_SIZE = 4096


def face_region_masks(points, image_size, latent_size, grow=EditRequest.mask_grow):
    """(R, h, w) uint8 latent masks (0..255) of the TRAINING_REGIONS for one face's landmarks."""
    masks = [latent_mask(region_mask([name], points, image_size, grow=grow), latent_size)[0, 0]
             for name in TRAINING_REGIONS]
    return (torch.stack(masks) * 255).round().to(torch.uint8)


def region_mask_bank(cache_dir, image_size, latent_size, run_dir, count=BANK_SIZE):
    """(M, R, h, w) uint8 region masks of up to `count` of the latent cache's faces, from the landmark file
    of the data folder it was encoded from, computed once and kept in RUN/region-masks.safetensors; None
    when that folder or its landmarks are gone.
    The faces are aligned, so one face's regions fit another's to about a latent cell: training draws a
    bank entry at random for each example instead of drawing every face's own (60 ms a face)."""
    path = Path(run_dir) / MASK_FILE
    if path.is_file():
        return load_file(path)["masks"]
    data_root = read_meta(cache_dir).data
    landmarks = read_landmarks(data_root) if Path(data_root).is_dir() else {}
    chosen = [landmarks[p.name] for p in cache_image_paths(cache_dir) if p.name in landmarks][:count] \
        if landmarks else []
    if not chosen:
        log.warning(f"{data_root} (the latents' data) has no landmarks: the inpainting masks are boxes only")
        return None
    log.info(f"drawing {len(TRAINING_REGIONS)} region masks for each of {len(chosen)} faces")
    masks = torch.stack([face_region_masks(points, image_size, latent_size) for points in chosen])
    with atomic_path(path) as tmp:
        save_tensors({"masks": masks}, tmp)
    return masks


def random_boxes(n, latent_size, generator, device):
    """(n, 1, h, w) masks of one axis-aligned box each, sides of 2 to latent_size // 2 + 2 cells."""
    low, high = 2, latent_size // 2 + 3
    size = torch.randint(low, high, (n, 2), generator=generator, device=device)
    corner = (torch.rand(n, 2, generator=generator, device=device) * (latent_size - size + 1)).long()
    cells = torch.arange(latent_size, device=device)
    rows = (cells >= corner[:, :1]) & (cells < corner[:, :1] + size[:, :1])
    cols = (cells >= corner[:, 1:]) & (cells < corner[:, 1:] + size[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]


def training_masks(x0, bank, inpaint_rate, generator):
    """(B, 1, h, w) masks for a batch of latents x0: with probability `inpaint_rate` a known region, three
    times in four one region of a random entry of `bank` ((M, R, h, w) uint8 region masks, or None) and else
    a random box; otherwise all ones (the whole latent generated)."""
    n, device = len(x0), x0.device
    known = random_boxes(n, x0.shape[-1], generator, device)
    if bank is not None:
        entry = torch.randint(len(bank), (n,), generator=generator, device=device)
        region = torch.randint(bank.shape[1], (n,), generator=generator, device=device)
        regions = bank[entry, region].float()[:, None] / 255
        use_region = torch.rand(n, generator=generator, device=device) < 0.75
        known = torch.where(use_region[:, None, None, None], regions, known)
    inpaint = torch.rand(n, generator=generator, device=device) < inpaint_rate
    return torch.where(inpaint[:, None, None, None], known, torch.ones_like(known))
