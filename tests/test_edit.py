import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.cli import app
from facegen_cli.config import SampleConfig
from facegen_cli.edit import (OVERLAY_WIDTH, REGIONS, darker_only, darkening_mask, edit_crops, edit_until_shown,
                              overlay_mask, overlay_width, paste_back, photo_change, reconstruct_crops, region_mask,
                              thin_overlay, thin_structure)
from facegen_cli.edit_request import EditRequest
from facegen_cli.errors import FacegenError
from facegen_cli.landmarks import (CANONICAL_POINTS, align_face, alignment, invert, similarity_transform,
                                   transform_points, warp)
from facegen_cli.pipeline import FacegenPipeline, latent_mask
from facegen_cli.synthfaces import render_face

runner = CliRunner()


@pytest.fixture(scope="module")
def face():
    image, labels, points = render_face(11, 128)
    return image, points



def request_vectors(request, current=None):
    return request.attributes(DEFAULT_ATTRIBUTES).condition(current)


def reference_vectors(request, current=None):
    return request.attributes(DEFAULT_ATTRIBUTES).reference(current)

INDEX = {name: i for i, name in enumerate(DEFAULT_ATTRIBUTES)}


def test_an_edit_holds_the_readings_but_takes_away_what_the_added_attribute_rules_out():
    current = -torch.ones(2, len(DEFAULT_ATTRIBUTES), dtype=torch.long)
    current[0, INDEX["black_hair"]] = current[0, INDEX["smiling"]] = 1  # a smiling face with black hair
    current[1, INDEX["wearing_hat"]] = current[1, INDEX["bangs"]] = 1  # a face with a hat and bangs
    y = request_vectors(EditRequest(add=("blond_hair",)), current)
    expected = current.float()
    expected[:, INDEX["blond_hair"]] = 1
    expected[0, INDEX["black_hair"]] = -1  # blond replaces black; the smile and everything else stay
    assert torch.equal(y, expected)
    y = request_vectors(EditRequest(add=("bald",), remove=("smiling",)), current)
    assert y[1, INDEX["bald"]] == 1 and y[1, INDEX["wearing_hat"]] == -1 and y[1, INDEX["bangs"]] == -1
    assert y[0, INDEX["black_hair"]] == 1 and (y[:, INDEX["smiling"]] == -1).all()  # bald keeps side hair colour
    # Without readings, only the request is asked; the rest stays free.
    free = request_vectors(EditRequest(add=("blond_hair",)))
    assert free.shape == (1, len(DEFAULT_ATTRIBUTES)) and free.abs().sum() == 1 and free[0, INDEX["blond_hair"]] == 1


def test_an_edit_is_guided_away_from_the_face_as_it_is_with_the_change_reversed():
    current = -torch.ones(2, len(DEFAULT_ATTRIBUTES), dtype=torch.long)
    current[:, INDEX["black_hair"]] = current[:, INDEX["smiling"]] = 1
    reference = reference_vectors(EditRequest(add=("blond_hair",), remove=("smiling",)), current)
    expected = current.float()
    expected[:, INDEX["blond_hair"]] = -1  # not blond, still smiling, and its black hair as it was
    expected[:, INDEX["smiling"]] = 1
    assert torch.equal(reference, expected)
    assert current[0, INDEX["smiling"]] == 1  # the readings themselves are left alone
    free = reference_vectors(EditRequest(add=("mustache",)))
    assert free.shape == (1, len(DEFAULT_ATTRIBUTES)) and free.abs().sum() == 1 and free[0, INDEX["mustache"]] == -1


def test_the_default_strength_follows_the_change_unless_one_is_given():
    assert EditRequest(add=("mustache",)).start == 0.8  # keeps the skin's colour under the new mustache
    assert EditRequest(add=("blond_hair",)).start == 1.0 and EditRequest(remove=("bald",)).start == 1.0
    assert EditRequest(add=("smiling", "bald")).start == 1.0  # the largest of the changes' strengths
    assert EditRequest(remove=("pale_skin",)).start == 0.7 and EditRequest(add=("male", "beard")).start == 0.8
    assert EditRequest(add=("blond_hair",), strength=0.5).start == 0.5


def inside(mask, point):
    return mask[int(round(point[1])), int(round(point[0]))] > 0.5


def between(p, q, w=0.5):
    return (p[0] + w * (q[0] - p[0]), p[1] + w * (q[1] - p[1]))


def test_each_region_covers_its_feature_and_not_the_others(face):
    _, p = face
    eye, mouth = p["left_eye"], between(p["mouth_left"], p["mouth_right"])
    above_hair = (p["hairline_center"][0], p["hairline_center"][1] - 12)
    beside_jaw = (p["jaw_1"][0] - 6, p["jaw_1"][1])  # side hair or a beard
    expect = {  # attribute: (points inside, points outside)
        "mustache": ([between(p["nose_base"], p["upper_lip"])], [eye, p["jaw_4"]]),
        "beard": ([between(p["lower_lip"], p["jaw_4"]), between(p["jaw_2"], mouth)], [eye, p["nose_tip"]]),
        "eyeglasses": ([p["left_eye"], p["right_eye"], between(p["left_eye"], p["right_eye"])], [mouth, p["jaw_4"]]),
        "smiling": ([p["mouth_left"], p["mouth_right"], mouth],
                    [eye, above_hair, between(p["nose_tip"], p["nose_base"])]),  # the nose kept
        "bangs": ([between(p["hairline_center"], p["left_brow_inner"])], [eye, mouth]),
        "wearing_hat": ([above_hair], [mouth, eye, p["left_brow_inner"]]),
        "bald": ([above_hair], [p["nose_tip"], eye, mouth, beside_jaw]),
        "black_hair": ([above_hair, beside_jaw], [p["nose_tip"], eye]),
        "blond_hair": ([above_hair], [p["nose_tip"], eye]),
        "pale_skin": ([p["nose_tip"], eye, mouth], [(2, 2), (2, 125)]),
        "young": ([p["nose_tip"], eye, mouth], [(2, 2)]),
        "male": ([p["nose_tip"], above_hair], [(2, 125)]),
    }
    assert set(expect) == set(REGIONS)
    for attribute, (ins, outs) in expect.items():
        mask = region_mask([attribute], p, 128, grow=2, feather=2)
        assert mask.shape == (128, 128) and mask.min() >= 0 and mask.max() == 1
        for point in ins:
            assert inside(mask, point), (attribute, "misses", point)
        for point in outs:
            assert not inside(mask, point), (attribute, "covers", point)


def test_a_mustache_keeps_the_lips_unless_another_region_repaints_them(face):
    _, p = face
    lips = [between(p["upper_lip"], p["lower_lip"], w) for w in (0.4, 0.6)]  # inside the kept part's soft edge
    mustache = region_mask(["mustache"], p, 128)
    assert inside(mustache, between(p["nose_base"], p["upper_lip"]))
    assert all(mustache[int(round(y)), int(round(x))] == 0 for x, y in lips)  # the photo's own, exactly
    both = region_mask(["mustache", "beard"], p, 128)
    assert all(inside(both, point) for point in lips)  # the beard's region takes the lips in
    assert np.array_equal(np.maximum(mustache, region_mask(["beard"], p, 128)), both)


def test_hair_colour_regions_keep_to_the_person_and_the_others_ignore_it(face):
    _, p = face
    person = np.zeros((128, 128), dtype=np.float32)
    person[:, 40:88] = 1.0  # a narrow person: the background beside the head is not theirs
    for attribute in ("black_hair", "blond_hair"):
        cut, whole = region_mask([attribute], p, 128, person=person), region_mask([attribute], p, 128)
        assert whole[:, :25].max() == 1 and cut[:, :34].max() == 0 and cut[:, 94:].max() == 0  # a few pixels
        assert cut[:, 36:92].max() == 1  # past the person's outline at most, not the region's growth
        assert np.array_equal(cut[:, 58:70], whole[:, 58:70])  # on the person, beyond the feathering: as before
        assert np.array_equal(region_mask([attribute], p, 128, person=np.ones_like(person)), whole)
    for attribute in ("bald", "wearing_hat", "mustache"):
        assert np.array_equal(region_mask([attribute], p, 128, person=person), region_mask([attribute], p, 128))


def test_mask_grow_feathers_outwards_and_unknown_regions_are_refused(face):
    _, p = face
    small, big = region_mask(["mustache"], p, 128, grow=0, feather=0), region_mask(["mustache"], p, 128, grow=6)
    assert (big >= small).all() and big.sum() > small.sum() * 1.5
    with pytest.raises(FacegenError, match="unknown attribute"):
        region_mask(["freckles"], p, 128)


def test_latent_mask_covers_every_touched_cell_with_a_soft_border():
    mask = np.zeros((128, 128), dtype=np.float32)
    mask[60:70, 60:62] = 1
    latent = latent_mask(mask, 16)
    assert latent.shape == (1, 1, 16, 16)
    assert latent[0, 0, 7:9, 7].eq(1).all() and latent[0, 0, 7, 6] == 0.5 and latent[0, 0, 0, 0] == 0


def test_alignment_round_trip_maps_landmarks_back_within_a_pixel(face):
    image, points = face
    # A "photo": the face scaled 2.3x, rotated 12 degrees and shifted into a 400x360 frame.
    angle, scale = np.radians(12), 2.3
    place = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 90],
                      [scale * np.sin(angle), scale * np.cos(angle), 40]])
    photo = warp(Image.fromarray(image), place, (400, 360))
    photo_points = transform_points(points, place)
    matrix = alignment(photo_points)
    crop, matrix, crop_points = align_face(photo, photo_points, 128)
    for name, (x, y) in CANONICAL_POINTS.items():  # the anchors land near the framing's (faces differ a little)
        assert abs(crop_points[name][0] - x) < 4 and abs(crop_points[name][1] - y) < 4
    back = transform_points(crop_points, invert(matrix))
    assert max(np.hypot(back[n][0] - photo_points[n][0], back[n][1] - photo_points[n][1]) for n in points) < 1e-6
    # ...and pixels follow the points: a dot drawn at a landmark is found at its aligned position.
    dotted = photo.copy()
    x, y = photo_points["nose_tip"]
    ImageDraw.Draw(dotted).ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 0, 255))
    crop = np.asarray(warp(dotted, matrix, (128, 128))).astype(int)
    magenta = (crop[..., 0] > 200) & (crop[..., 2] > 200) & (crop[..., 1] < 80)
    ys, xs = np.nonzero(magenta)
    assert abs(xs.mean() + 0.5 - crop_points["nose_tip"][0]) < 1 and abs(ys.mean() + 0.5 - crop_points["nose_tip"][1]) < 1


def test_similarity_transform_recovers_a_known_one():
    source = np.random.default_rng(0).uniform(0, 100, (6, 2))
    known = np.array([[1.2, -0.3, 5.0], [0.3, 1.2, -7.0]])
    target = source @ known[:, :2].T + known[:, 2]
    assert np.allclose(similarity_transform(source, target), known)


def test_masked_edit_keeps_every_pixel_outside_the_mask(tiny_model_dir, face):
    pipe = FacegenPipeline.load(tiny_model_dir)
    image, points = face
    crops = np.stack([image, image[:, ::-1]])
    masks = np.stack([region_mask(["mustache"], points, 128), region_mask(["eyeglasses"], points, 128)])
    request = EditRequest(add=("mustache",), sample=SampleConfig(steps=2), resample=2, seed=1)
    edited = edit_crops(pipe, crops, masks, request)
    outside = masks[..., None].repeat(3, -1) == 0
    assert np.array_equal(edited[outside], crops[outside])
    assert not np.array_equal(edited[~outside], crops[~outside])
    assert np.array_equal(edited, edit_crops(pipe, crops, masks, request))  # same seed, same result


@pytest.mark.parametrize("trajectory", ["inversion", "rf-inversion", "noise"])
def test_a_crop_is_edited_the_same_alone_or_in_any_batch(tiny_model_dir, face, trajectory):
    """Every draw is the crop's own (its seed's noise, its own RePaint generator): at fp32 a crop's edit
    alone and beside others differ by float rounding at most (before: up to 110 grey levels)."""
    pipe = FacegenPipeline.load(tiny_model_dir, precision="fp32")
    image, points = face
    crops = np.stack([image, image[:, ::-1], np.roll(image, 9, axis=0)])
    masks = np.stack([region_mask(["mustache"], points, 128), region_mask(["eyeglasses"], points, 128),
                      region_mask(["beard"], points, 128)])
    current = torch.tensor([[1, -1] * 6, [-1, 1] * 6, [1, 1] * 6])
    request = EditRequest(add=("mustache",), sample=SampleConfig(steps=3), resample=3, seed=5, trajectory=trajectory)
    together = edit_crops(pipe, crops, masks, request, current).astype(int)
    for i in range(3):
        alone = edit_crops(pipe, crops[i:i + 1], masks[i:i + 1], request, current[i:i + 1]).astype(int)
        assert np.abs(alone[0] - together[i]).max() <= 2
    reordered = edit_crops(pipe, crops[::-1].copy(), masks[::-1].copy(), request, current.flip(0)).astype(int)
    assert np.abs(reordered[::-1] - together).max() <= 2


class CornerReader:
    """A stand-in classifier: reads a mustache (logit 10) on a crop whose top-left pixel (outside every region,
    so never edited) is white, and counts the crops it is shown."""
    device = "cpu"
    config = SimpleNamespace(typical_logits=None)

    def __init__(self):
        self.seen = []

    def logits(self, images):
        self.seen.append(len(images))
        logits = -10 * torch.ones(len(images), len(DEFAULT_ATTRIBUTES))
        logits[:, INDEX["mustache"]] = torch.where(images[:, 0, 0, 0] > 0.9, 10.0, -10.0)
        return logits


def test_each_face_takes_the_least_guidance_that_shows_its_change(face):
    pipe = FacegenPipeline.load("demo", precision="fp32")  # the tiny model hardly responds to guidance
    image, points = face
    crops = np.stack([image, image[:, ::-1]])
    crops[0, 0, 0], crops[1, 0, 0] = 255, 0  # the first face shows its change at once, the second never
    masks = np.stack([region_mask(["mustache"], points, 128)] * 2)
    current = -torch.ones(2, len(DEFAULT_ATTRIBUTES), dtype=torch.long)
    request = EditRequest(add=("mustache",), sample=SampleConfig(steps=3, guidance=3.0), seed=2)
    assert request.rungs == (3.15, 4.5, 6.75, 9.0)  # RUNGS of the mustache's 9
    reader = CornerReader()
    edited, taken = edit_until_shown(pipe, crops, masks, request, current, reader, reconstruct_crops(pipe, crops, masks))
    assert taken.tolist() == [3.15, 9.0] and reader.seen == [2, 1, 1]  # the last rung is kept without a reading
    for i, guidance in enumerate(taken):
        alone = edit_crops(pipe, crops[i:i + 1], masks[i:i + 1], request, current[i:i + 1], guidance=guidance)
        assert np.abs(alone[0].astype(int) - edited[i]).max() <= 2
    weaker = edit_crops(pipe, crops[1:], masks[1:], request, current[1:], guidance=3.15)
    assert np.abs(weaker[0].astype(int) - edited[1]).max() > 2  # the second face's edit is the full guidance's
    assert EditRequest(add=("mustache",), sample=request.sample, guidance=2.0).rungs == (2.0,)  # given: that alone


def test_a_change_is_shown_when_read_as_surely_as_on_real_faces_with_it():
    request = EditRequest(add=("mustache",), remove=("smiling",))
    names = list(DEFAULT_ATTRIBUTES)
    logits = -torch.ones(4, len(DEFAULT_ATTRIBUTES))
    logits[:, INDEX["mustache"]] = torch.tensor([2.0, 4.0, 4.0, -1.0])
    logits[:, INDEX["smiling"]] = torch.tensor([-6.0, -6.0, -4.0, -6.0])
    assert request.shown(logits, names) == [True, True, True, False]  # the classifier's own call: the sign
    typical = {"with": {"mustache": 3.0}, "without": {"smiling": -5.0}}
    assert request.shown(logits, names, typical) == [False, True, False, False]
    weak = {"with": {"mustache": -2.0}, "without": {"smiling": 1.0}}  # never less sure than the classifier's call
    assert request.shown(logits, names, weak) == request.shown(logits, names)
    assert EditRequest(repaint=("beard",)).shown(logits, names, typical) == [True] * 4  # nothing asked


def test_repainting_with_nothing_asked_gives_back_the_crop_from_its_own_trajectory(tiny_model_dir, face):
    """With the crop's inverted trajectory, an edit that asks for nothing lands back on the crop's own
    reconstruction (Heun both ways), which paste_back then adds nothing from; fresh noise does not."""
    pipe = FacegenPipeline.load(tiny_model_dir, precision="fp32")
    image, points = face
    crops, masks = image[None], region_mask(["beard"], points, 128)[None]
    own = reconstruct_crops(pipe, crops, masks).astype(int)
    for trajectory, most in (("inversion", 3), ("noise", None)):
        request = EditRequest(repaint=("beard",), sample=SampleConfig(steps=12), trajectory=trajectory)
        difference = np.abs(edit_crops(pipe, crops, masks, request).astype(int) - own)
        if most is None:
            assert difference.max() > 10
        else:
            assert difference.max() <= most


def test_an_unsupported_change_is_said_in_one_line(caplog):
    from types import SimpleNamespace

    from facegen_cli.edit import warn_unsupported

    prepared = [SimpleNamespace(path="a.jpg", crops=[0, 1])]
    current = torch.ones(2, len(DEFAULT_ATTRIBUTES))
    current[1, DEFAULT_ATTRIBUTES.index("male")] = -1
    caplog.set_level("WARNING", logger="facegen_cli")
    warn_unsupported(prepared, EditRequest(add=("mustache",)), DEFAULT_ATTRIBUTES, current)
    assert [r.getMessage() for r in caplog.records] == [
        "a.jpg: face 1 reads as not male; CelebA has almost no women with a mustache, so the mustache may not show"]


def test_paste_back_changes_only_the_masked_pixels_of_the_photo(face):
    image, points = face
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    matrix = alignment({n: (x * 1.5 + 100, y * 1.5 + 20) for n, (x, y) in points.items()})
    mask = region_mask(["beard"], transform_points({n: (x * 1.5 + 100, y * 1.5 + 20) for n, (x, y) in points.items()},
                                                   matrix), 128)
    darker = (image * 0.5).astype(np.uint8)
    result, photo_mask = paste_back(photo, darker, image, mask, matrix)
    original = np.asarray(photo)
    assert result.shape == original.shape and photo_mask.shape == original.shape[:2]
    assert np.array_equal(result[photo_mask == 0], original[photo_mask == 0])
    assert (photo_mask > 0).mean() > 0.02 and not np.array_equal(result[photo_mask > 0], original[photo_mask > 0])
    # Only the change reaches the photo: an edit equal to the reconstruction leaves every pixel as it was,
    # the photo's own detail included, however unlike the photo the reconstruction is.
    unchanged, _ = paste_back(photo, image, image, mask, matrix)
    assert np.array_equal(unchanged, original)
    # ...and a change is added to the photo's pixels, not pasted over them.
    inside = photo_mask == 255
    assert (result[inside].astype(int) - original[inside]).mean() < -10
    assert np.corrcoef(result[inside].ravel(), original[inside].ravel())[0, 1] > 0.9


def test_an_overlay_keeps_the_thin_lines_of_a_change_and_drops_its_broad_shading():
    """Glasses: a frame drawn over a tinted lens reaches the photo as the frame alone, at its full contrast."""
    change = np.zeros((1, 64, 64, 3), dtype=np.float32)
    change[0, 10:40, 10:40] = -30  # a tinted lens, 30 px wide
    change[0, 10:40, 24:26] -= 50  # a frame's bar across it, 2 px wide
    change[0, 50:52, 5:60] = 40  # a light line, 2 px high, on nothing
    thin = thin_structure(change)
    assert np.allclose(thin[0, 10:40, 24:26], -50) and np.allclose(thin[0, 50:52, 5:60], 40)
    assert np.allclose(thin[0, 12:38, 12:22], 0) and np.allclose(thin[0, 12:38, 28:38], 0)  # the tint is gone
    assert np.allclose(thin_structure(np.zeros_like(change)), 0)
    # Where the overlay is 0 the change is kept whole; where the edit changed nothing, the reconstruction is exact.
    rng = np.random.default_rng(0)
    reconstructed = rng.integers(90, 200, (2, 64, 64, 3)).astype(np.uint8)  # no change clipped
    edited = np.clip(reconstructed + change.astype(int), 0, 255).astype(np.uint8)
    overlays = np.zeros((2, 64, 64), dtype=np.float32)
    overlays[1] = 1
    out = thin_overlay(edited, reconstructed, overlays)
    assert np.array_equal(out[0], edited[0])
    assert np.array_equal(out[1, 12:38, 12:22], reconstructed[1, 12:38, 12:22])
    assert (out[1, 10:40, 24:26].astype(int) - reconstructed[1, 10:40, 24:26] < -45).all()
    # A frame takes the change's brightness alone: a coloured line comes out neutral, as dark on every channel.
    tinted = edited.copy()
    tinted[1, 50:52, 5:60] = np.clip(reconstructed[1, 50:52, 5:60].astype(int) + [60, 0, 0], 0, 255)
    line = thin_overlay(tinted, reconstructed, overlays)[1, 50:52, 5:60].astype(int) - reconstructed[1, 50:52, 5:60]
    assert (np.abs(line - 20) <= 1).all()
    # A crop's result is the same alone or in a batch.
    assert np.array_equal(thin_overlay(edited[1:], reconstructed[1:], overlays[1:]), out[1:])
    # In a zoomed view a frame is more pixels wide: the width grows with the zoom and stays odd (a centred square).
    assert overlay_width() == OVERLAY_WIDTH == 7 and overlay_width(1.5) == 11 and overlay_width(2.0) == 15


def test_only_glasses_are_overlays(face):
    _, p = face
    assert [name for name, region in REGIONS.items() if region.overlay] == ["eyeglasses"]
    glasses = overlay_mask(["eyeglasses", "mustache"], p, 128)
    assert np.array_equal(glasses, region_mask(["eyeglasses"], p, 128))
    assert not overlay_mask(["mustache", "beard"], p, 128).any()


def test_an_added_mustache_only_darkens_the_face(face):
    """A mustache's change reaches the photo where it darkens: its lighter halo is dropped, its dark band kept
    exactly; elsewhere, and for other kinds, the change is whole; nothing changed gives the reconstruction."""
    _, p = face
    assert [name for name, region in REGIONS.items() if region.darkens] == ["mustache"]
    assert np.array_equal(darkening_mask(["mustache", "beard"], p, 128), region_mask(["mustache"], p, 128))
    assert not darkening_mask(["beard", "eyeglasses"], p, 128).any()
    rng = np.random.default_rng(0)
    reconstructed = rng.integers(90, 200, (2, 32, 32, 3)).astype(np.uint8)  # no change clipped
    change = np.zeros((2, 32, 32, 3), dtype=int)
    change[:, 12:16] = -40  # the band
    change[:, 8:12] = 25  # the halo above it
    change[:, 20:24] = [30, -12, -18]  # a tint, no brighter nor darker: half of it kept
    edited = (reconstructed + change).astype(np.uint8)
    darkening = np.zeros((2, 32, 32), dtype=np.float32)
    darkening[1] = 1
    out = darker_only(edited, reconstructed, darkening)
    assert np.array_equal(out[0], edited[0])
    assert np.array_equal(out[1, 12:16], edited[1, 12:16]) and np.array_equal(out[1, 8:12], reconstructed[1, 8:12])
    assert np.abs(out[1, 20:24].astype(int) - reconstructed[1, 20:24] - np.array([15, -6, -9])).max() <= 1
    assert np.array_equal(darker_only(reconstructed, reconstructed, darkening), reconstructed)
    assert np.array_equal(darker_only(edited[1:], reconstructed[1:], darkening[1:]), out[1:])  # alone or batched
    # photo_change: the frames of an overlay, then darker only; neither where both masks are 0
    none = np.zeros_like(darkening)
    assert np.array_equal(photo_change(edited, reconstructed, none, none), edited)
    assert np.array_equal(photo_change(edited, reconstructed, none, darkening), out)


def write_face_photo(path, seed=3):
    """A built-in face placed in a larger photo (MediaPipe finds these reliably)."""
    face = Image.fromarray(render_face(seed, 256)[0])
    photo = Image.new("RGB", (360, 320), (90, 120, 150))
    photo.paste(face, (60, 30))
    photo.save(path)
    return path


def test_edit_a_folder_reports_bad_files_and_loses_nothing(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    photos = tmp_path / "photos"
    photos.mkdir()
    write_face_photo(photos / "good.png")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (photos / "notes.txt").write_text("not an image")
    Image.new("RGB", (200, 200), (30, 160, 60)).save(photos / "grass.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    result = runner.invoke(app, ["edit", str(photos), "--add", "mustache", "--model", str(tiny_model_dir),
                                 "--steps", "2", "--out", str(tmp_path / "out"), "--save-mask"])
    assert result.exit_code == 1
    assert result.stdout.split() == [str(tmp_path / "out" / "good.png")]
    assert "grass.png: no face found" in result.stderr
    assert "corrupt.jpg: cannot read the image" in result.stderr and "notes.txt: cannot read" in result.stderr
    assert "1 done, 1 no face, 2 unreadable" in result.stderr
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # inputs untouched
    edited = np.asarray(Image.open(tmp_path / "out" / "good.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "good.png.mask.png"))
    original = np.asarray(Image.open(photos / "good.png"))
    assert edited.shape == original.shape and mask.shape == original.shape[:2]
    assert np.array_equal(edited[mask == 0], original[mask == 0]) and (mask > 0).any()

    allowed = runner.invoke(app, ["edit", str(photos / "good.png"), str(photos / "grass.png"), "--add", "beard",
                                  "--model", str(tiny_model_dir), "--steps", "1", "--out", str(tmp_path / "out2"),
                                  "--allow-missing"])
    assert allowed.exit_code == 0, allowed.stderr


def test_edit_reads_paths_from_stdin_and_refuses_bad_requests(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    photo = write_face_photo(tmp_path / "a.png")
    result = runner.invoke(app, ["edit", "-", "--remove", "eyeglasses", "--model", str(tiny_model_dir), "--steps", "1",
                                 "--out", str(tmp_path / "out")], input=f"{photo}\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out" / "a.png")
    unknown = runner.invoke(app, ["edit", str(photo), "--add", "freckles", "--model", str(tiny_model_dir)])
    assert unknown.exit_code == 1 and "unknown attribute 'freckles'" in unknown.stderr
    nothing = runner.invoke(app, ["edit", str(photo), "--model", str(tiny_model_dir)])
    assert nothing.exit_code == 1 and "nothing to change" in nothing.stderr
    same = runner.invoke(app, ["edit", str(photo), "--add", "beard", "--model", str(tiny_model_dir),
                               "--out", str(tmp_path)])
    assert same.exit_code == 1 and "would overwrite the input" in same.stderr


def test_mediapipe_finds_a_face_in_a_real_photo():
    pytest.importorskip("mediapipe")
    skimage_data = pytest.importorskip("skimage.data")
    from facegen_cli.landmarks import FaceFinder

    finder = FaceFinder()
    faces = finder(skimage_data.astronaut())
    finder.close()
    assert len(faces) == 1
    p = faces[0]
    assert p["left_eye"][0] < p["nose_tip"][0] < p["right_eye"][0]
    assert p["left_eye"][1] < p["nose_tip"][1] < p["upper_lip"][1] < p["lower_lip"][1] < p["jaw_4"][1]


def test_mediapipe_stopping_on_one_image_costs_that_image_only():
    """MediaPipe runs in its own process: an abort inside it (an OpenCV assertion once took a whole folder's
    edit with it) is one image's error, and the next image is answered by a new one."""
    import os
    import signal

    pytest.importorskip("mediapipe")
    skimage_data = pytest.importorskip("skimage.data")
    from facegen_cli.errors import FacegenError
    from facegen_cli.landmarks import FaceFinder

    finder = FaceFinder()
    image = skimage_data.astronaut()
    first = finder(image)
    os.kill(finder.child.pid, signal.SIGABRT)  # what OpenCV's failed assertion does
    with pytest.raises(FacegenError, match=r"MediaPipe\) stopped on this image \(signal SIGABRT\)"):
        finder(image)
    assert finder(image) == first  # a new child, the same answer
    finder.close()


def test_the_person_is_segmented_from_the_background_of_a_real_photo():
    pytest.importorskip("mediapipe")
    skimage_data = pytest.importorskip("skimage.data")
    from facegen_cli.landmarks import FaceFinder

    image = skimage_data.astronaut()
    finder = FaceFinder()
    p = finder(image)[0]
    person = finder.person(image)
    finder.close()
    assert person.shape == image.shape[:2] and person.min() >= 0 and person.max() <= 1
    x, y = (int(round(c)) for c in p["nose_tip"])
    assert person[y, x] > 0.9 and person[int(p["hairline_center"][1]) - 10, x] > 0.5  # face and hair
    assert person[5:60, 5:60].mean() < 0.1  # the flag and the wall in the photo's top left corner


def test_edit_respects_exif_orientation(tmp_path, tiny_model_dir):
    """A JPEG stored sideways with an EXIF 'rotate 90' tag is edited upright and written upright."""
    pytest.importorskip("mediapipe")
    upright = Image.open(write_face_photo(tmp_path / "upright.png")).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    sideways.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    result = runner.invoke(app, ["edit", str(tmp_path / "photo.jpg"), "--add", "beard", "--model",
                                 str(tiny_model_dir), "--steps", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out" / "photo.jpg") as edited:
        assert edited.size == upright.size and edited.format == "JPEG"


def test_contradictory_edits_are_refused_before_any_photo_is_read(tmp_path, tiny_model_dir):
    photo = tmp_path / "missing.png"  # never read: the request is checked first
    for args, message in ((["--add", "beard", "--remove", "beard"], "both to add and to remove beard"),
                          (["--add", "black_hair", "--add", "blond_hair"], "cannot add both black_hair and blond_hair")):
        result = runner.invoke(app, ["edit", str(photo), *args, "--model", str(tiny_model_dir)])
        assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_finding_faces_prints_no_library_logging():
    import subprocess
    import sys

    pytest.importorskip("mediapipe")
    pytest.importorskip("skimage.data")
    code = ("import sys; from skimage.data import astronaut; from facegen_cli.landmarks import FaceFinder; "
            "f = FaceFinder(); n = len(f(astronaut())); f.close(); print('own message', file=sys.stderr); print(n)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"
    assert result.stderr.strip() == "own message"  # facegen's own output still shows


def test_a_face_that_fills_the_photo_and_a_small_photo_are_found():
    from pathlib import Path

    pytest.importorskip("mediapipe")
    photos = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "photos"
    if not photos.is_dir():
        pytest.skip(f"{photos} is not here (the shared fixtures live beside the project)")
    from facegen_cli.landmarks import FaceFinder

    finder = FaceFinder()
    close_up = np.asarray(Image.open(photos / "45-m7-di-ph.jpg").convert("RGB"))  # chin cut by the edge
    small = np.asarray(Image.open(photos / "single_face.jpg").convert("RGB").resize((110, 108)))
    assert len(finder(close_up)) == 1 and len(finder(small)) == 1
    p = finder(small)[0]
    assert 0 < p["left_eye"][0] < p["right_eye"][0] < 110  # in the small photo's own pixels
    finder.close()


def test_in_place_edits_keep_the_photo_as_it_was_outside_the_mask(tmp_path, tiny_model_dir):
    """PNG: every pixel outside the mask, the ICC profile, EXIF and the file mode are kept. JPEG: written
    with the source's own quantization tables and subsampling, so the pixels outside the mask differ only
    by one re-encoding (measured here: mean < 1 grey level), EXIF and ICC kept. CMYK stays CMYK."""
    import os

    from PIL import ImageCms

    pytest.importorskip("mediapipe")
    base = Image.open(write_face_photo(tmp_path / "face.png")).convert("RGB")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x013B] = "A. Photographer"  # Artist
    base.save(tmp_path / "face.png", icc_profile=icc, exif=exif)
    base.save(tmp_path / "face.jpg", quality=92, icc_profile=icc, exif=exif)
    base.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    for name in ("face.png", "face.jpg", "cmyk.jpg"):
        os.chmod(tmp_path / name, 0o644)
    before = {name: Image.open(tmp_path / name) for name in ("face.png", "face.jpg", "cmyk.jpg")}
    for image in before.values():
        image.load()
    result = runner.invoke(app, ["edit", str(tmp_path / "face.png"), str(tmp_path / "face.jpg"),
                                 str(tmp_path / "cmyk.jpg"), "--add", "mustache", "--in-place", "--steps", "1",
                                 "--trajectory", "noise",  # the tiny model changes little along a trajectory
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.stderr
    masks = {}
    for name, old in before.items():
        new = Image.open(tmp_path / name)
        assert new.format == old.format and new.mode == old.mode and new.size == old.size
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644)
        changed = np.asarray(new).astype(int) != np.asarray(old).astype(int)
        masks[name] = changed
        if name != "cmyk.jpg":
            assert new.info.get("icc_profile") == icc and new.getexif().get(0x013B) == "A. Photographer"
    assert masks["face.png"].any()
    # PNG: exact outside the region the edit touched; the region is a small part of the photo
    assert masks["face.png"].any(-1).mean() < 0.1
    for name in ("face.jpg", "cmyk.jpg"):
        new, old = Image.open(tmp_path / name), before[name]
        assert new.quantization == old.quantization
        outside = ~masks["face.png"].any(-1)  # the same faces and masks as the PNG's
        difference = np.abs(np.asarray(new).astype(int) - np.asarray(old).astype(int))[outside]
        assert difference.mean() < 1.0, (name, difference.mean())


def test_animated_images_are_refused_and_left_alone(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    face = Image.open(write_face_photo(tmp_path / "face.png")).convert("RGB")
    face.save(tmp_path / "anim.gif", save_all=True, append_images=[face.rotate(5)], duration=100)
    original = (tmp_path / "anim.gif").read_bytes()
    result = runner.invoke(app, ["edit", str(tmp_path / "anim.gif"), "--add", "beard", "--in-place",
                                 "--steps", "1", "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "animated image (2 frames)" in result.stderr
    assert (tmp_path / "anim.gif").read_bytes() == original


def test_a_second_run_skips_the_outputs_it_made_unless_overwrite(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    photo = write_face_photo(tmp_path / " spaced name .png")  # names from stdin keep their spaces
    args = ["edit", "-", "--add", "beard", "--model", str(tiny_model_dir), "--steps", "1", "--out", str(tmp_path / "o")]
    assert runner.invoke(app, args, input=f"{photo}\n").exit_code == 0
    again = runner.invoke(app, args, input=f"{photo}\n")
    assert again.exit_code == 0 and "exists; skipped (--overwrite replaces it)" in again.stderr
    assert "0 done, 1 skipped" in again.stderr
    forced = runner.invoke(app, [*args, "--overwrite"], input=f"{photo}\n")
    assert forced.exit_code == 0 and "1 done" in forced.stderr


def test_an_unwritable_output_fails_each_photo_in_one_line_and_the_run_ends_with_its_summary(tmp_path, tiny_model_dir):
    import os

    pytest.importorskip("mediapipe")
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc, a file system where no folder can be made")
    photos = tmp_path / "photos"
    photos.mkdir()
    write_face_photo(photos / "a.png")
    write_face_photo(photos / "b.png", seed=4)
    result = runner.invoke(app, ["edit", str(photos), "--add", "beard", "--steps", "1", "--model",
                                 str(tiny_model_dir), "--out", "/proc/facegen-out"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("cannot write /proc/facegen-out/") == 2
    assert "0 done, 2 failed" in result.stderr


def test_a_strength_that_is_not_a_finite_number_is_refused(tmp_path):
    result = runner.invoke(app, ["edit", str(tmp_path), "--add", "beard", "--strength", "nan"])
    assert result.exit_code == 2 and "--strength" in result.stderr and "Traceback" not in result.stderr


def test_masks_written_by_save_mask_are_not_taken_as_photos(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    (tmp_path / "photos").mkdir()
    write_face_photo(tmp_path / "photos" / "a.png")
    # a light touch (strength 0.05): the tiny model's repaint must leave a face to find the second time
    first = runner.invoke(app, ["edit", str(tmp_path / "photos"), "--add", "beard", "--steps", "1", "--save-mask",
                                "--strength", "0.05", "--model", str(tiny_model_dir), "--out", str(tmp_path / "once")])
    assert first.exit_code == 0 and (tmp_path / "once" / "a.png.mask.png").is_file()
    second = runner.invoke(app, ["edit", str(tmp_path / "once"), "--add", "smiling", "--steps", "1",
                                 "--model", str(tiny_model_dir), "--out", str(tmp_path / "twice")])
    assert second.exit_code == 0, second.stderr
    assert "skipping 1 mask(s)" in second.stderr and sorted(p.name for p in (tmp_path / "twice").iterdir()) == ["a.png"]


def test_sixteen_bit_grey_photos_stay_sixteen_bit_and_exact_outside_the_mask(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    grey = np.asarray(Image.open(write_face_photo(tmp_path / "face.png")).convert("L")).astype(np.uint16)
    deep = grey * 257 + np.random.default_rng(0).integers(0, 200, grey.shape).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    result = runner.invoke(app, ["edit", str(tmp_path / "deep.png"), "--add", "beard", "--steps", "1", "--save-mask",
                                 "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    edited = Image.open(tmp_path / "out" / "deep.png")
    mask = np.asarray(Image.open(tmp_path / "out" / "deep.png.mask.png"))
    assert edited.mode == "I;16" and (mask > 0).any()
    assert np.array_equal(np.asarray(edited)[mask == 0], deep[mask == 0])  # every 16-bit value kept


@pytest.fixture
def model_with_classifier(tmp_path, tiny_model_dir):
    """The tiny model's folder with an (untrained) attribute classifier, as eval edits needs."""
    import shutil

    from facegen_cli.classifier import AttributeClassifier, save_classifier

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    save_classifier(AttributeClassifier(attributes=DEFAULT_ATTRIBUTES), model / "classifier", {})
    return model


def test_edits_are_measured_at_the_photos_own_resolution(tmp_path, model_with_classifier):
    """facegen eval edits: per kind the edit and the no-op floor, nothing changed outside the mask, and the
    before/after crops at the photo's own pixels (not the model's 128)."""
    pytest.importorskip("mediapipe")
    pytest.importorskip("dlib")
    import json

    model = model_with_classifier
    photo = Image.open(write_face_photo(tmp_path / "face.png")).resize((720, 640), Image.Resampling.LANCZOS)
    photo.save(tmp_path / "big.png")
    result = runner.invoke(app, ["eval", "edits", str(tmp_path / "big.png"), "--kind", "mustache", "--model",
                                 str(model), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(e["kind"], e["noop"]) for e in report["edits"]] == [("mustache", False), ("mustache", True)]
    assert all(e["changed_outside"] == 0 and 0 <= e["identity"] < 2 for e in report["edits"])
    assert set(report["summary"]["mustache"]) == {"edited", "noop"}
    with Image.open(tmp_path / "report" / "crops" / "mustache" / "big.png") as crop:
        assert crop.height > 256  # the face at the photo's pixels: the face is about 2x the model's framing


def test_super_resolved_content_reaches_the_photo_only_where_the_edit_changed_it(face):
    """super_resolve runs the network over the mask's box alone; an edit equal to the reconstruction still
    changes no pixel of the photo at 4x, and pixels outside the mask stay the photo's own."""
    from facegen_cli.edit import UPSCALE_FROM, super_resolve
    from facegen_cli.landmarks import face_scale

    class Bicubic(torch.nn.Module):  # a 4x upscaler with the network's interface, fast and predictable
        scale = 4

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic")

    net = Bicubic()
    image, points = face
    placed = {n: (x * 2.5 + 60, y * 2.5 + 30) for n, (x, y) in points.items()}
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (420, 480, 3), dtype=np.uint8))
    matrix = alignment(placed)
    assert face_scale(matrix) == pytest.approx(2.5 * face_scale(alignment(points))) and face_scale(matrix) >= UPSCALE_FROM
    mask = region_mask(["mustache"], transform_points(placed, matrix), 128)
    darker = (image * 0.5).astype(np.uint8)
    fine_edit, fine_own = super_resolve(net, darker, image, mask)
    assert fine_edit.shape == (512, 512, 3)
    rows, cols = np.nonzero(mask > 0)
    away = np.ones((512, 512), dtype=bool)
    away[4 * max(rows.min() - 12, 0):4 * (rows.max() + 13), 4 * max(cols.min() - 12, 0):4 * (cols.max() + 13)] = False
    assert not fine_edit[away].any() and not fine_own[away].any()  # the network ran over the mask's box alone
    result, photo_mask = paste_back(photo, fine_edit, fine_own, mask, matrix)
    original = np.asarray(photo)
    assert np.array_equal(result[photo_mask == 0], original[photo_mask == 0])
    assert not np.array_equal(result[photo_mask > 0], original[photo_mask > 0])
    same_edit, same_own = super_resolve(net, image, image, mask)
    assert np.array_equal(paste_back(photo, same_edit, same_own, mask, matrix)[0], original)


def test_a_photo_no_face_fits_in_is_reported_and_the_batch_goes_on(tmp_path, tiny_model_dir):
    """A 3000x2 PNG once aborted the whole run inside MediaPipe (an OpenCV assertion, SIGABRT)."""
    pytest.importorskip("mediapipe")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (3000, 2), (120, 90, 60)).save(photos / "a-strip.png")
    Image.new("RGB", (8, 8), (120, 90, 60)).save(photos / "b-tiny.png")
    write_face_photo(photos / "c-good.png")
    result = runner.invoke(app, ["edit", str(photos), "--add", "beard", "--steps", "1", "--no-upscale",
                                 "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "a-strip.png: no face found" in result.stderr and "b-tiny.png: no face found" in result.stderr
    assert "1 done, 2 no face" in result.stderr and (tmp_path / "out" / "c-good.png").is_file()


def test_edited_photos_record_what_was_changed(tmp_path, tiny_model_dir):
    """A PNG text chunk, or XMP in a JPEG beside the photo's own; a second edit is added to the first."""
    pytest.importorskip("mediapipe")
    from facegen_cli.images import EDITS_KEY, edits_in, read_frames

    face = Image.open(write_face_photo(tmp_path / "face.png")).convert("RGB")
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' \
          b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>a photographer' \
          b'</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>'
    face.save(tmp_path / "face.jpg", xmp=xmp, quality=95)
    common = ["--steps", "1", "--no-upscale", "--model", str(tiny_model_dir)]
    first = runner.invoke(app, ["edit", str(tmp_path / "face.png"), str(tmp_path / "face.jpg"), "--add", "beard",
                                *common, "--out", str(tmp_path / "once")])
    assert first.exit_code == 0, first.stderr
    again = runner.invoke(app, ["edit", str(tmp_path / "once" / "face.png"), str(tmp_path / "once" / "face.jpg"),
                                "--remove", "smiling", *common, "--out", str(tmp_path / "twice")])
    assert again.exit_code == 0, again.stderr
    for name in ("face.png", "face.jpg"):
        edits = edits_in(read_frames(tmp_path / "twice" / name)[1])
        assert [(e["add"], e["remove"]) for e in edits] == [(["beard"], []), ([], ["smiling"])]
        assert edits[0]["faces"] == 1 and edits[0]["model"] == tiny_model_dir.name and len(edits[0]["fingerprint"]) == 16
    assert EDITS_KEY in Image.open(tmp_path / "twice" / "face.png").text
    assert b"<dc:creator>a photographer</dc:creator>" in Image.open(tmp_path / "twice" / "face.jpg").info["xmp"]


def test_a_lossless_webp_stays_lossless_and_exact_outside_the_mask(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    from facegen_cli.images import is_lossless_webp

    Image.open(write_face_photo(tmp_path / "face.png")).save(tmp_path / "face.webp", lossless=True)
    result = runner.invoke(app, ["edit", str(tmp_path / "face.webp"), "--add", "beard", "--steps", "1", "--save-mask",
                                 "--no-upscale", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert is_lossless_webp(tmp_path / "out" / "face.webp")
    edited, original = (np.asarray(Image.open(p).convert("RGB")) for p in (tmp_path / "out" / "face.webp",
                                                                          tmp_path / "face.webp"))
    mask = np.asarray(Image.open(tmp_path / "out" / "face.webp.mask.png"))
    assert (mask > 0).any() and np.array_equal(edited[mask == 0], original[mask == 0])


def test_sixteen_bit_rgb_photos_stay_sixteen_bit_and_exact_outside_the_mask(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    import cv2

    from facegen_cli.images import read_deep_rgb

    rgb = np.asarray(Image.open(write_face_photo(tmp_path / "face.png")).convert("RGB")).astype(np.uint16)
    deep = rgb * 257 + np.random.default_rng(0).integers(0, 200, rgb.shape).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_deep_rgb(tmp_path / "deep.png"), deep)
    # fresh noise: the tiny model's FlowEdit step can be smaller than one 8-bit level
    result = runner.invoke(app, ["edit", str(tmp_path / "deep.png"), "--add", "beard", "--steps", "1", "--save-mask",
                                 "--trajectory", "noise", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    edited = read_deep_rgb(tmp_path / "out" / "deep.png")
    mask = np.asarray(Image.open(tmp_path / "out" / "deep.png.mask.png"))
    assert edited is not None and (mask > 0).any()
    assert np.array_equal(edited[mask == 0], deep[mask == 0])  # every 16-bit value kept
    assert not np.array_equal(edited[mask > 0], deep[mask > 0])
    assert json.loads(Image.open(tmp_path / "out" / "deep.png").text["facegen-edits"])[0]["add"] == ["beard"]


def test_an_edit_takes_as_many_steps_as_the_models_sampler_makes_model_calls():
    from facegen_cli.edit_request import edit_sample

    assert edit_sample(SampleConfig(steps=25, method="euler")) == SampleConfig(steps=25, method="euler")
    assert edit_sample(SampleConfig(steps=13, method="heun", guidance=2.0)) == SampleConfig(steps=25, guidance=2.0)
    assert edit_sample(SampleConfig(steps=13, method="stochastic")) == SampleConfig(steps=13, method="euler")
    assert edit_sample(SampleConfig(steps=13, method="heun"), steps=4).steps == 4  # --steps


def test_the_default_guidance_follows_the_change_unless_one_is_given():
    from facegen_cli.edit_request import GUIDANCES, guidance_help

    sample = SampleConfig(steps=4, guidance=3.0)
    assert EditRequest(add=("mustache",), sample=sample).settings.guidance == GUIDANCES["mustache"] == 9.0
    assert EditRequest(add=("bangs",), sample=sample).settings.guidance == 3.0  # the model's
    assert EditRequest(add=("beard", "male"), sample=sample).settings.guidance == 5.0  # the largest of the changes'
    assert EditRequest(add=("mustache",), sample=sample, guidance=2.0).settings.guidance == 2.0
    assert EditRequest(repaint=("mustache",), sample=sample).settings.guidance == 3.0  # nothing asked: the no-op
    assert EditRequest(add=("mustache",), sample=sample).settings.steps == 4
    assert "9 for mustache;" in guidance_help() and "3.5 for smiling, male;" in guidance_help()  # --help shows the table
    with pytest.raises(FacegenError, match="out of range"):
        EditRequest(add=("mustache",), sample=sample, guidance=1e30).settings


def test_a_stopped_edit_measurement_keeps_the_kinds_it_finished(tmp_path, model_with_classifier, monkeypatch):
    """eval edits writes its report after each kind: stopped in the second kind, the first is on disk."""
    pytest.importorskip("mediapipe")
    pytest.importorskip("dlib")
    import json

    from facegen_cli import photo_eval
    from facegen_cli.pipeline import FacegenPipeline

    measure_one = photo_eval.measure_one

    def stopped_at_beard(pipe, classifier, embedder, finder, path, kind, *args):
        if kind == "beard":
            raise KeyboardInterrupt
        return measure_one(pipe, classifier, embedder, finder, path, kind, *args)

    monkeypatch.setattr(photo_eval, "measure_one", stopped_at_beard)
    pipe = FacegenPipeline.load(str(model_with_classifier))
    with pytest.raises(KeyboardInterrupt):
        photo_eval.measure_photo_edits(pipe, pipe.load_classifier(), [write_face_photo(tmp_path / "face.png")],
                                       tmp_path / "report", kinds=("mustache", "beard"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {e["kind"] for e in report["edits"]} == {"mustache"} and list(report["summary"]) == ["mustache"]
