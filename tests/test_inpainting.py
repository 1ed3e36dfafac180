"""The inpainting model: the mask and the known latent as inputs, its training masks, and its fine-tune."""

import dataclasses

import numpy as np
import pytest
import torch

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.config import load_preset
from facegen_cli.edit import region_mask
from facegen_cli.errors import FacegenError
from facegen_cli.inpainting import MASK_FILE, TRAINING_REGIONS, face_region_masks, training_masks
from facegen_cli.layout import IMAGE_DIR, LANDMARK_NAMES, write_layout
from facegen_cli.model import LatentDiT, inpainting_context
from facegen_cli.pipeline import FacegenPipeline, latent_mask
from facegen_cli.synthfaces import render_face
from facegen_cli.train import train


def tiny_inpainting_preset(**train_overrides):
    preset = load_preset("tiny")
    return dataclasses.replace(preset, model=dataclasses.replace(preset.model, inpainting=True),
                               train=dataclasses.replace(preset.train, inpaint_rate=0.7, **train_overrides))


def test_an_inpainting_model_started_from_a_plain_one_is_that_model_until_trained():
    torch.manual_seed(0)
    shape = load_preset("tiny").model
    plain = LatentDiT(**shape.config(DEFAULT_ATTRIBUTES))
    for p in plain.parameters():  # a trained model: nothing at zero
        torch.nn.init.normal_(p, std=0.05)
    inpainting = LatentDiT(**dataclasses.replace(shape, inpainting=True).config(DEFAULT_ATTRIBUTES))
    missing, unexpected = inpainting.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["context_embedder.bias", "context_embedder.weight"] and not unexpected
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 12).sign()
    context = inpainting_context(torch.randn(3, 4, 16, 16), (torch.rand(3, 1, 16, 16) > 0.5).float())
    assert torch.equal(inpainting(x, t, y, context), plain(x, t, y))
    torch.nn.init.normal_(inpainting.context_embedder.weight, std=0.05)
    assert not torch.allclose(inpainting(x, t, y, context), plain(x, t, y))
    # No context is "nothing known": the whole latent generated.
    nothing = inpainting_context(torch.zeros_like(x), torch.ones(3, 1, 16, 16))
    assert torch.equal(inpainting(x, t, y), inpainting(x, t, y, nothing))
    with pytest.raises(ValueError, match="no inpainting context"):
        plain(x, t, y, context)


def test_the_context_hides_the_latent_under_the_mask():
    known, mask = torch.randn(2, 4, 16, 16), torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:8, 4:8] = 1
    context = inpainting_context(known, mask)
    assert context.shape == (2, 5, 16, 16) and torch.equal(context[:, :1], mask)
    assert torch.all(context[:, 1:, 4:8, 4:8] == 0) and torch.equal(context[:, 1:, :4], known[:, :, :4])
    # Changing the latent under the mask changes nothing the model is shown.
    hidden = known.clone()
    hidden[:, :, 4:8, 4:8] += 5
    assert torch.equal(inpainting_context(hidden, mask), context)


def test_training_masks_are_the_edit_regions_or_boxes_at_the_rate_asked():
    _, _, points = render_face(11, 128)
    masks = face_region_masks(points, 128, 16)
    assert masks.shape == (len(TRAINING_REGIONS), 16, 16) and masks.dtype == torch.uint8
    mustache = TRAINING_REGIONS.index("mustache")
    expected = latent_mask(region_mask(["mustache"], points, 128), 16)[0, 0]
    assert torch.allclose(masks[mustache].float() / 255, expected, atol=1 / 255)
    # the cell under the upper lip is repainted for a mustache, the brows' are not
    lip, brow = points["upper_lip"], points["left_brow_inner"]
    assert masks[mustache, int(lip[1] - 2) // 8, int(lip[0]) // 8] == 255
    assert masks[mustache, int(brow[1]) // 8, int(brow[0]) // 8] < 8

    x0, bank = torch.zeros(4000, 4, 16, 16), masks[None]
    generator = torch.Generator().manual_seed(0)
    whole = training_masks(x0, bank, 0.0, generator)
    assert torch.equal(whole, torch.ones(4000, 1, 16, 16))
    drawn = training_masks(x0, bank, 0.7, generator)
    known_somewhere = (drawn < 1).flatten(1).any(1).float().mean()
    assert 0.65 < known_somewhere < 0.75  # a box or a region never covers the whole latent but for hair and sex
    regions = {tuple(m.flatten().tolist()) for m in (bank[0].float() / 255)}
    from_bank = sum(tuple(m.flatten().tolist()) in regions for m in drawn[:400, 0])
    assert from_bank > 0.4 * 400
    boxes = training_masks(x0[:50], None, 1.0, generator)
    assert set(boxes.unique().tolist()) == {0.0, 1.0} and (boxes.flatten(1).sum(1) >= 4).all()


def write_landmarks(data):
    """Turn the tiny CSV data set into a CelebA layout with a landmark file (the rendered face's points)."""
    import csv

    with open(data / "attributes.csv") as f:
        rows = list(csv.reader(f))[1:]
    _, _, points = render_face(11, 128)
    write_layout(data, ["Male"], [(name, [int(values[0])], 0, points) for name, *values in rows],
                 list(LANDMARK_NAMES))
    (data / "attributes.csv").unlink()
    (data / IMAGE_DIR).mkdir()
    for png in data.glob("*.png"):
        png.rename(data / IMAGE_DIR / png.name)


def test_an_inpainting_fine_tune_trains_from_the_plain_model_and_repaints_only_the_mask(tmp_path, tiny_run,
                                                                                          tiny_model_dir):
    cache = tiny_run / "latents"
    model_dir = train(tiny_inpainting_preset(max_steps=3), cache, tmp_path / "run", init_from=tiny_model_dir)
    pipe, plain = FacegenPipeline.load(model_dir, precision="fp32"), FacegenPipeline.load(tiny_model_dir)
    assert pipe.dit.inpainting and pipe.dit.config.context_channels == 5 and not plain.dit.inpainting
    assert pipe.info.init_from.fingerprint and pipe.info.trained_steps == 6 + 3
    images = pipe.generate(torch.zeros(12), seeds=[0], settings=pipe.settings(steps=2))
    assert images.shape == (1, 3, 128, 128)
    crops = torch.rand(2, 3, 128, 128) * 2 - 1
    masks = np.zeros((2, 128, 128), dtype=np.float32)
    masks[:, 40:80, 40:80] = 1
    y = torch.zeros(2, 12)
    for start in ("noise", "inversion"):
        out = pipe.inpaint(crops, masks, y, y, seeds=[0, 1], settings=pipe.settings(steps=2), start=start)
        alone = pipe.inpaint(crops[1:], masks[1:], y[1:], y[1:], seeds=[1], settings=pipe.settings(steps=2),
                             start=start)
        assert out.shape == crops.shape and (out[1] - alone[0]).abs().max() < 2 / 255  # float rounding at most


def test_the_region_masks_come_from_the_datas_landmarks_and_are_drawn_once(tmp_path, tiny_data, tiny_vae_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    write_landmarks(data)
    out = tmp_path / "run"
    train(tiny_inpainting_preset(max_steps=1), data, out, vae_source=str(tiny_vae_dir))
    from safetensors.torch import load_file

    bank = load_file(out / MASK_FILE)["masks"]
    assert bank.shape == (24, len(TRAINING_REGIONS), 16, 16)
    _, _, points = render_face(11, 128)
    assert torch.equal(bank[0], face_region_masks(points, 128, 16))


def test_a_plain_model_cannot_start_from_an_inpainting_one(tmp_path, tiny_run, tiny_model_dir):
    cache = tiny_run / "latents"
    inpainting = train(tiny_inpainting_preset(max_steps=1), cache, tmp_path / "a", init_from=tiny_model_dir)
    with pytest.raises(FacegenError, match="context_channels 5 vs 0"):
        train(load_preset("tiny").with_train(max_steps=1), cache, tmp_path / "b", init_from=inpainting)
