"""Shared fixtures: a tiny VAE saved with save_pretrained, a tiny labelled data set, a tiny model."""

import csv

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from facegen_cli.attributes import DEFAULT_ATTRIBUTES


def make_tiny_vae():
    """An f8 AutoencoderKL (3 downsamplings, 4 latent channels) small enough for tests."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    make_tiny_vae().save_pretrained(path)
    return path


def write_labelled_folder(root, count, attributes=DEFAULT_ATTRIBUTES, size=128, seed=0):
    """A CSV-layout data set whose images depend on the labels (colour ~ first attributes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        labels = rng.choice([-1, 1], size=len(attributes))
        image = np.zeros((size, size, 3), dtype=np.uint8)
        image[..., 0] = 200 if labels[0] > 0 else 40
        image[..., 1] = 200 if labels[1] > 0 else 40
        image[size // 4: 3 * size // 4, size // 4: 3 * size // 4, 2] = 220 if labels[2] > 0 else 20
        image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
        name = f"img_{i:04d}.png"
        Image.fromarray(image).save(root / name)
        rows.append([name, *labels.tolist()])
    with open(root / "attributes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", *attributes])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_labelled_folder(tmp_path_factory.mktemp("data") / "faces", 24)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data, tiny_vae_dir):
    """A tiny model trained for a few steps through the library (fast; quality irrelevant)."""
    from facegen_cli.config import load_preset
    from facegen_cli.train import train

    out = tmp_path_factory.mktemp("run")
    train(load_preset("tiny").with_train(max_steps=6), tiny_data, out, vae_source=str(tiny_vae_dir))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_run):
    return tiny_run / "model"


def assert_shipped_in_float16(folder, max_mib, parts=("dit", "vae", "classifier")):
    """A shipped model folder: the `parts`' weights, all floats in float16, within max_mib."""
    files = sorted(folder.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == set(parts)
    assert sum(f.stat().st_size for f in files) <= max_mib * 2**20
    for f in files:
        with safe_open(f, "pt") as weights:
            dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
            assert "F16" in dtypes and not dtypes & {"F32", "F64", "BF16"}, (f, dtypes)  # counters stay ints
