"""Zoomed views (framing.py): their geometry, a framed model, its training data, and edits that use them."""

import dataclasses

import numpy as np
import pytest
import torch

from facegen_cli import framing
from facegen_cli.framing import Framing, compose, covering, drawn, features, zoom_limit
from facegen_cli.model import LatentDiT

SIZE = 128


def test_a_view_is_the_aligned_crop_zoomed_about_its_centre():
    view = Framing(2.0, 40.0, 90.0)
    m = view.matrix(SIZE)
    assert m @ [40, 90, 1] == pytest.approx([64, 64])
    assert m @ [41, 90, 1] - m @ [40, 90, 1] == pytest.approx([2, 0])
    assert Framing.whole(SIZE).matrix(SIZE) == pytest.approx(np.eye(2, 3))
    assert features([Framing.whole(SIZE)], SIZE).abs().max() == 0  # the whole face is the embedding's zero
    inner = np.array([[0.5, 0.1, 3.0], [-0.1, 0.5, 7.0]])
    point = np.array([11.0, 23.0, 1.0])
    assert view.of(inner, SIZE) @ point == pytest.approx(m @ [*(inner @ point), 1])
    assert compose(np.eye(2, 3), inner) == pytest.approx(inner)


def test_training_views_stay_inside_the_crop_and_within_what_the_photo_holds():
    views = [drawn(f"{i:06d}.jpg", 1.6, SIZE) for i in range(600)]
    assert views == [drawn(f"{i:06d}.jpg", 1.6, SIZE) for i in range(600)]  # fixed by the name
    assert all(drawn(f"{i:06d}.jpg", 0.7, SIZE) == Framing.whole(SIZE) for i in range(50))  # a soft photo: whole
    zoomed = [v for v in views if v.zoom > 1]
    assert 0.6 < len(zoomed) / len(views) < 0.8  # 30% drawn whole for generation
    assert all(framing.MIN_ZOOM <= v.zoom <= zoom_limit(1.6) + 1e-9 for v in zoomed)
    for v in zoomed:
        half = SIZE / (2 * v.zoom)
        assert half <= v.cx <= SIZE - half and half <= v.cy <= SIZE - half


def test_an_edit_view_holds_its_region_with_a_margin():
    box = (50, 86, 80, 100)  # a mustache's, in the aligned crop
    view = covering(box, 3.0, SIZE)
    assert view.zoom == pytest.approx(framing.MAX_ZOOM)
    corners = view.matrix(SIZE) @ np.array([[box[0], box[2]], [box[1], box[3]], [1, 1]])
    assert corners.min() >= 6 * view.zoom - 1e-6 and corners.max() <= SIZE - 6 * view.zoom + 1e-6
    assert covering(box, 0.85, SIZE) == Framing.whole(SIZE)  # the photo holds no zoom
    assert covering((10, 20, 118, 120), 3.0, SIZE) == Framing.whole(SIZE)  # no zoom fits the region
    near_edge = covering((0, 100, 30, 127), 3.0, SIZE)  # clamped to stay inside the crop, still holding it
    assert near_edge.cx - SIZE / (2 * near_edge.zoom) >= 0 and near_edge.cy + SIZE / (2 * near_edge.zoom) <= SIZE


def tiny_dit(**extra):
    torch.manual_seed(0)
    return LatentDiT(attributes=("a", "b", "c"), latent_size=8, hidden_size=32, depth=2, num_heads=2, mlp_size=64,
                     **extra)


def test_a_framed_model_starts_as_the_plain_one_then_reads_the_framing():
    plain, framed = tiny_dit(), tiny_dit(framing=True)
    torch.nn.init.normal_(plain.final_layer.linear.weight)  # an output that is not all zeros
    for block in plain.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    missing, unexpected = framed.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("framing_embedder.") for k in missing) and not unexpected
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([[1.0, 0, -1], [0, 0, 0], [1, 1, 1]])
    views = features([Framing(2, 50, 90), Framing.whole(SIZE), Framing(1.5, 64, 50)], SIZE)
    with torch.no_grad():
        expected = plain(x, t, y)
        assert torch.equal(framed(x, t, y, framing=views), expected)
        torch.nn.init.normal_(framed.framing_embedder.mlp[-1].weight, std=0.1)
        assert torch.equal(framed(x, t, y), framed(x, t, y, framing=torch.zeros(3, 3)))  # None = whole faces
        assert not torch.allclose(framed(x, t, y, framing=views), framed(x, t, y))
    with pytest.raises(ValueError, match="no framing"):
        plain(x, t, y, framing=views)


def tiny_framed_preset(**train_overrides):
    from facegen_cli.config import load_preset

    preset = load_preset("tiny")
    return dataclasses.replace(preset, model=dataclasses.replace(preset.model, framing=True),
                               train=dataclasses.replace(preset.train, **train_overrides))


def test_a_framed_fine_tune_starts_from_the_plain_model_and_reads_the_views_its_data_lists(
        tmp_path, tiny_data, tiny_vae_dir, tiny_model_dir, caplog):
    import csv
    import logging
    import shutil

    from facegen_cli.cache import cache_image_paths
    from facegen_cli.framing import framing_bank
    from facegen_cli.layout import IMAGE_DIR, write_layout
    from facegen_cli.pipeline import FacegenPipeline
    from facegen_cli.train import train

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    with open(data / "attributes.csv") as f:
        rows = list(csv.reader(f))[1:]
    views = {name: (2.0, 50.0, 80.0) if i % 2 else (1.0, 64.0, 64.0) for i, (name, *_) in enumerate(rows)}
    write_layout(data, ["Male"], [(name, [int(values[0])], 0, None) for name, *values in rows], framings=views)
    (data / "attributes.csv").unlink()
    (data / IMAGE_DIR).mkdir()
    for png in data.glob("*.png"):
        png.rename(data / IMAGE_DIR / png.name)

    with caplog.at_level(logging.INFO):
        model_dir = train(tiny_framed_preset(max_steps=2), data, tmp_path / "run", vae_source=str(tiny_vae_dir),
                          init_from=tiny_model_dir)
    assert "12 of 24 latents are zoomed views" in caplog.text
    cache = tmp_path / "run" / "latents"
    expected = features([Framing(*views[p.name]) for p in cache_image_paths(cache)], SIZE)
    assert torch.equal(framing_bank(cache, SIZE), expected)
    pipe = FacegenPipeline.load(model_dir, precision="fp32")
    assert pipe.dit.framed and not FacegenPipeline.load(tiny_model_dir).dit.framed
    assert pipe.info.trained_steps == 6 + 2


@pytest.fixture(scope="module")
def framed_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model made framed, its framing embedding and modulations not zero (as a trained one's are
    not: six steps leave adaLN-Zero's near zero, so that no condition would change much)."""
    from facegen_cli.pipeline import FacegenPipeline

    pipe = FacegenPipeline.load(tiny_model_dir, precision="fp32")
    dit = LatentDiT.from_config(pipe.dit.config, framing=True)
    dit.load_state_dict(pipe.dit.state_dict(), strict=False)
    torch.manual_seed(0)
    torch.nn.init.normal_(dit.framing_embedder.mlp[-1].weight, std=0.2)
    for layer in [block.adaLN_modulation[-1] for block in dit.blocks] + [dit.final_layer.adaLN_modulation[-1]]:
        torch.nn.init.normal_(layer.weight, std=0.05)
    return pipe.replaced(dit=dit.eval().requires_grad_(False)).save(tmp_path_factory.mktemp("framed") / "model")


def test_a_zoomed_edit_repaints_the_regions_view_and_keeps_the_photo_outside_its_mask(tmp_path, framed_model_dir):
    pytest.importorskip("mediapipe")
    from PIL import Image
    from test_edit import write_face_photo

    from facegen_cli.edit import edit_prepared, prepare_photo
    from facegen_cli.edit_request import EditRequest
    from facegen_cli.landmarks import FaceFinder
    from facegen_cli.pipeline import FacegenPipeline

    photo = write_face_photo(tmp_path / "face.png")  # the face at twice the framing
    pipe = FacegenPipeline.load(framed_model_dir, precision="fp32")
    request = EditRequest(add=("mustache",), sample=pipe.settings(steps=2))
    finder = FaceFinder()
    try:
        zoomed = prepare_photo(photo, tmp_path / "out.png", finder, request, SIZE, zoom=True)
        whole = prepare_photo(photo, tmp_path / "out.png", finder, request, SIZE, zoom=False)
    finally:
        finder.close()
    assert zoomed.views[0].zoom > 1.5 and whole.views == [Framing.whole(SIZE)]  # a mouth's view
    assert np.array_equal(zoomed.faces, whole.crops)  # the classifier reads the aligned face either way
    original = np.asarray(Image.open(photo).convert("RGB"))
    results = {}
    for name, prepared in (("zoomed", zoomed), ("whole", whole)):
        [edited] = edit_prepared(pipe, [prepared], request)
        pixels, mask = edited.pixels, edited.mask
        assert np.array_equal(pixels[mask == 0], original[mask == 0]) and (mask > 0).any()
        results[name] = pixels, mask > 0
    # The same part of the photo is repainted, whichever view drew it...
    (zoomed_pixels, zoomed_mask), (whole_pixels, whole_mask) = results["zoomed"], results["whole"]
    assert (zoomed_mask & whole_mask).sum() / (zoomed_mask | whole_mask).sum() > 0.85
    # ...but by another drawing.
    assert not np.array_equal(zoomed_pixels, whole_pixels)


def test_a_view_is_edited_the_same_alone_or_in_a_batch_of_other_views(framed_model_dir):
    from facegen_cli.edit import edit_crops
    from facegen_cli.edit_request import EditRequest
    from facegen_cli.pipeline import FacegenPipeline

    pipe = FacegenPipeline.load(framed_model_dir, precision="fp32")
    request = EditRequest(add=("smiling",), sample=pipe.settings(steps=2), trajectory="noise", strength=1.0)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    masks[:, 40:90, 30:100] = 1
    views = [Framing(2.0, 60, 90), Framing.whole(SIZE), Framing(1.5, 64, 40)]
    together = edit_crops(pipe, crops, masks, request, views=views).astype(int)
    for i in range(3):
        alone = edit_crops(pipe, crops[i:i + 1], masks[i:i + 1], request, views=views[i:i + 1]).astype(int)
        assert np.abs(together[i] - alone[0]).max() <= 2  # float rounding at most
