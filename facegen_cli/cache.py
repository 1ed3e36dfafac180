"""Latent caches: a data set encoded once by the VAE, so that training never runs the encoder.

A cache is a folder:
    cache.json               what made it (VAE source and fingerprint, image size, attributes),
                             the per-channel latent mean/std, and whether it is complete
    shard-00000.safetensors  "latents" (n, C, h, w) float16, "labels" (n, A) int8, "index" (n,) int64

Shards are written atomically and skipped when present, so an interrupted `facegen encode`
resumes where it stopped. A cache made with one VAE refuses latents from another.
"""

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .data import ImageDataset, collate_readable, read_dataset
from .errors import FacegenError, first_line
from .files import atomic_path, save_tensors, write_json
from .images import to_tensor
from .vae import encode, load_vae, vae_fingerprint

log = logging.getLogger(__name__)
META_FILE = "cache.json"
CACHE_FORMAT = "facegen-latents"
SHARD_SIZE = 4096


@dataclass(kw_only=True)
class CacheMeta:
    """A latent cache's cache.json: what made it, and (once complete) the latents' shape and statistics."""
    format: str = CACHE_FORMAT
    version: int = 1
    data: str  # the data folder, resolved
    split: str
    vae_source: str  # the VAE's folder (resolved) or hub id: training decodes with it
    vae_fingerprint: str
    image_size: int
    attributes: list
    num_listed: int
    shard_size: int = SHARD_SIZE
    complete: bool = False
    num_shards: Optional[int] = None
    num_images: Optional[int] = None
    num_unreadable: Optional[int] = None
    latent_shape: Optional[list] = None
    latent_mean: list = field(default_factory=list)  # per channel
    latent_std: list = field(default_factory=list)

    # what must match for a cache to be resumed rather than refused
    IDENTITY = ("vae_fingerprint", "image_size", "attributes", "data", "split", "shard_size")

    def to_dict(self):
        data = asdict(self)
        return data if self.complete else {k: v for k, v in data.items() if v not in (None, [])}


def is_cache(path):
    return (Path(path) / META_FILE).is_file()


def _shard_path(out, k):
    return Path(out) / f"shard-{k:05d}.safetensors"


def encode_dataset(data_dir, vae_source, out, *, image_size=128, split="all", batch_size=32, workers=2,
                   device="cpu", progress=None):
    """Encode a labelled data set with the VAE `vae_source` (hub id or folder) into a latent cache at `out`.

    Returns the cache's CacheMeta.
    """
    data = read_dataset(data_dir, split)
    vae = load_vae(vae_source, device)
    out = Path(out)
    meta = CacheMeta(data=str(Path(data_dir).resolve()), split=split,
                     vae_source=str(Path(vae_source).resolve()) if Path(vae_source).exists() else str(vae_source),
                     vae_fingerprint=vae_fingerprint(vae), image_size=image_size, attributes=data.attributes,
                     num_listed=len(data.paths))
    if is_cache(out):
        old = read_meta(out)
        for key in CacheMeta.IDENTITY:
            if getattr(old, key) != getattr(meta, key):
                raise FacegenError(f"{out} holds a cache made with another {key.replace('_', ' ')} "
                                   f"({getattr(old, key)!r}, not {getattr(meta, key)!r}); refusing to mix latents: "
                                   "choose a new --out")
    elif out.exists() and any(out.iterdir()):
        raise FacegenError(f"{out} exists and is not a latent cache; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / META_FILE, meta.to_dict())

    num_shards = (len(data.paths) + SHARD_SIZE - 1) // SHARD_SIZE
    unreadable = 0
    task = progress.add_task("encoding", total=len(data.paths)) if progress else None
    advance = (lambda n: progress.advance(task, n)) if progress else (lambda n: None)
    for k in range(num_shards):
        shard = _read_shard(out, k)
        if shard is None:
            shard = _encode_shard(vae, data, k, image_size, batch_size, workers, advance)
            with atomic_path(_shard_path(out, k)) as tmp:
                save_tensors(shard, tmp)
        else:
            advance(min((k + 1) * SHARD_SIZE, len(data.paths)) - k * SHARD_SIZE)
        unreadable += len(shard.get("unreadable", torch.zeros(0)))

    latents, _ = load_latents(out, num_shards)
    if len(latents) == 0:
        raise FacegenError(f"{data_dir}: none of the {len(data.paths)} images could be read")
    meta.complete, meta.num_shards, meta.num_images, meta.num_unreadable = True, num_shards, len(latents), unreadable
    meta.latent_shape = list(latents.shape[1:])
    meta.latent_mean = latents.double().mean(dim=(0, 2, 3)).tolist()
    meta.latent_std = latents.double().std(dim=(0, 2, 3)).tolist()
    write_json(out / META_FILE, meta.to_dict())
    return meta


def _encode_shard(vae, data, k, image_size, batch_size, workers, advance):
    """Shard k's tensors: the latents and labels of its readable images, and the indices of the others."""
    start, stop = k * SHARD_SIZE, min((k + 1) * SHARD_SIZE, len(data.paths))
    loader = torch.utils.data.DataLoader(ImageDataset(data.paths[start:stop], image_size), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate_readable)
    latents, index, bad = [], [], []
    for local_indices, images, bad_indices in loader:
        bad += [start + i for i in bad_indices]
        if images is not None:
            latents.append(encode(vae, to_tensor(images)).half())
            index += [start + i for i in local_indices]
        advance(len(local_indices) + len(bad_indices))
    for i in bad:
        log.info(f"skipped unreadable image {data.paths[i]}")
    index = torch.tensor(index, dtype=torch.int64)
    return {"latents": torch.cat(latents) if latents else torch.zeros(0), "labels": data.labels[index].contiguous(),
            "index": index, "unreadable": torch.tensor(bad, dtype=torch.int64)}


def read_meta(path):
    """A cache's CacheMeta."""
    try:
        data = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FacegenError(f"{path}: unreadable latent cache metadata ({e})") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise FacegenError(f"{path}: not a facegen latent cache")
    known = {f.name for f in fields(CacheMeta)}
    try:
        return CacheMeta(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise FacegenError(f"{Path(path) / META_FILE}: {e}") from None


def _read_shard(out, k):
    """Shard k's tensors, or None when it is missing or damaged (then reported: it is encoded again)."""
    path = _shard_path(out, k)
    if not path.is_file():
        return None
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        log.warning(f"{path} is damaged ({first_line(e)}); encoding its images again")
        return None


def load_latents(path, num_shards):
    shards = []
    for k in range(num_shards):
        try:
            shards.append(load_file(_shard_path(path, k)))
        except (OSError, SafetensorError) as e:
            raise FacegenError(f"{_shard_path(path, k)} is damaged ({first_line(e)}); run `facegen encode` "
                               "again with the same arguments: it encodes that shard anew") from None
    shards = [s for s in shards if s["latents"].numel()]
    if not shards:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int8)
    return torch.cat([s["latents"] for s in shards]).float(), torch.cat([s["labels"] for s in shards])


def load_cache(path):
    """(latents float32 (N, C, h, w), labels int8 (N, A), CacheMeta) of a complete cache."""
    meta = read_meta(path)
    if not meta.complete:
        raise FacegenError(f"{path}: the latent cache is incomplete; run `facegen encode` again to finish it")
    latents, labels = load_latents(path, meta.num_shards)
    return latents, labels, meta


def cache_image_paths(path):
    """The image file of each latent of a complete cache, in the cache's order (its shards' "index" into the
    data folder's listing of the split)."""
    meta = read_meta(path)
    listing = read_dataset(meta.data, meta.split).paths
    index = torch.cat([load_file(_shard_path(path, k))["index"] for k in range(meta.num_shards)])
    return [listing[i] for i in index.tolist()]
