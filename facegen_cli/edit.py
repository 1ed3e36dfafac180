"""Local repainting of faces in photos by attribute: landmarks -> aligned crop -> region mask ->
masked latent diffusion -> composite -> inverse warp into the photo.

Pixels where the (feathered, grown) mask is 0 come back exactly as they were; inside it the model
redraws the face with the requested attributes, the rest of the face held fixed around it.
"""

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from .attributes import check_names
from . import __version__
from .errors import FacegenError
from .files import FileResult, Outcome, attempt, output_path, save_deep_rgb, save_image
from .images import deep_grey_scale, read_deep_rgb, read_photo, to_rgb, to_tensor, to_uint8, with_edit_recorded
from . import framing
from .landmarks import FaceFinder, align_face, face_scale, frame, invert, transform_points, warp

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Region masks, from named landmarks in the aligned frame
# ---------------------------------------------------------------------------------------------

def _xy(p):
    return np.asarray(p, dtype=np.float64)


def _face_oval(p):
    """Jaw from temple to temple, closed over the forehead through the hairline points."""
    return [p[f"jaw_{i}"] for i in range(9)] + [p["hairline_right"], p["hairline_center"], p["hairline_left"]]


def _mustache(p):
    left, right = _xy(p["mouth_left"]), _xy(p["mouth_right"])
    pad = 0.25 * (right[0] - left[0])
    top, bottom = p["nose_base"][1], p["upper_lip"][1]
    return [[(left[0] - pad, top), (right[0] + pad, top), (right[0] + pad, bottom), (left[0] - pad, bottom)]]


def _beard(p):
    """Cheeks from the nose base down, the jaw and the chin; the top dips to the upper lip in the middle."""
    top = p["nose_base"][1]
    jaw = [p[f"jaw_{i}"] for i in range(1, 8)]
    left, right = _xy(p["mouth_left"]), _xy(p["mouth_right"])
    pad = 0.15 * (right[0] - left[0])
    return [[(jaw[0][0], top)] + jaw + [(jaw[-1][0], top), (right[0] + pad, p["upper_lip"][1]),
                                        (left[0] - pad, p["upper_lip"][1])]]


GLASSES_BELOW_BROWS = 0.25  # how far from the brows down to the eyes the glasses' region starts


def _eyeglasses(p):
    """The band over both eyes, from GLASSES_BELOW_BROWS of the way below the brows (grown and feathered, the
    region then fades out over the brows instead of redrawing them whole: redrawn, they came out greyer under the
    frames; 38 photos: dlib identity 0.313 -> 0.289) to 0.9 of the brows' height above the eyes below them."""
    brows = [p[name][1] for name in ("left_brow_inner", "right_brow_inner", "left_brow_outer", "right_brow_outer")]
    eye = (p["left_eye"][1] + p["right_eye"][1]) / 2
    top = max(brows) + GLASSES_BELOW_BROWS * (eye - max(brows))
    bottom = eye + 0.9 * (eye - min(brows))
    return [[(p["jaw_0"][0], top), (p["jaw_8"][0], top), (p["jaw_8"][0], bottom), (p["jaw_0"][0], bottom)]]


def _lips(p):
    """Both lips and the mouth between them, from corner to corner: a mustache grows above them, and an open
    smile stays open."""
    left, right = _xy(p["mouth_left"]), _xy(p["mouth_right"])
    inner = [left + 0.25 * (right - left), right - 0.25 * (right - left)]
    top, bottom = p["upper_lip"][1], p["lower_lip"][1]
    return [[tuple(left), (inner[0][0], top), p["upper_lip"], (inner[1][0], top), tuple(right),
             (inner[1][0], bottom), p["lower_lip"], (inner[0][0], bottom)]]


def _nose(p):
    """The nose's lower half, as wide as the inner eye corners are apart (about the width of the nostrils): a
    smile grown over it redrew the nose tip into a pale blob."""
    half = abs(p["right_eye_inner"][0] - p["left_eye_inner"][0]) / 2
    x, tip, base = p["nose_tip"][0], p["nose_tip"][1], p["nose_base"][1]
    top = tip - 0.5 * (base - tip)
    return [[(x - half, top), (x + half, top), (x + half, base), (x - half, base)]]


def _smiling(p):
    left, right = _xy(p["mouth_left"]), _xy(p["mouth_right"])
    pad = 0.45 * (right[0] - left[0])
    top = (p["nose_tip"][1] + p["nose_base"][1]) / 2
    bottom = p["lower_lip"][1] + 0.6 * (p["lower_lip"][1] - p["upper_lip"][1])
    return [[(left[0] - pad, top), (right[0] + pad, top), (right[0] + pad, bottom), (left[0] - pad, bottom)]]


def _forehead(p):
    brow = min(p["left_brow_inner"][1], p["right_brow_inner"][1])
    hair = p["hairline_center"][1]
    top = hair - 0.6 * (brow - hair)
    return [[(p["jaw_0"][0], top), (p["jaw_8"][0], top), (p["jaw_8"][0], brow), (p["jaw_0"][0], brow)]]


def _hair(p):
    """Everything around the head down to the chin, the face oval excluded (see region_mask)."""
    width = p["jaw_8"][0] - p["jaw_0"][0]
    left, right = p["jaw_0"][0] - 0.45 * width, p["jaw_8"][0] + 0.45 * width
    top = p["hairline_center"][1] - 1.2 * (p["jaw_4"][1] - p["hairline_center"][1])
    bottom = p["jaw_4"][1]
    return [[(left, top), (right, top), (right, bottom), (left, bottom)]]


HAT_FOREHEAD = 0.7  # how far up from the brows to the hairline a hat's region stops (0: at the brows)


def _above_brows(p, up=0.0):
    """The head above the brows, or above `up` of the way from them to the hairline: the scalp that baldness
    bares (the side hair below the brows and a beard stay the photo's own), or a hat."""
    (left, top), (right, _), *_ = _hair(p)[0]
    brow = max(p["left_brow_inner"][1], p["right_brow_inner"][1])
    bottom = brow - up * (brow - p["hairline_center"][1])
    return [[(left, top), (right, top), (right, bottom), (left, bottom)]]


def _hat(p):
    """A hat's crown and brim above the upper forehead, the brows and eyes the photo's own. Down to the
    brows, the brim was drawn over them and the brows redrawn, which most of a hat's identity distance was
    (38 photos: dlib 0.305 -> 0.181, the largest 0.502 -> 0.373, shown on 94 -> 97%)."""
    return _above_brows(p, HAT_FOREHEAD)


def _whole_face(p):
    return [_face_oval(p)]


@dataclass(frozen=True)
class Region:
    """Where an attribute is repainted: `draw`'s polygons, less the face oval when `cut_face`, less the
    polygons of `keep` (after the region is grown and feathered: what stays the photo's own, exactly).
    `overlay`: the change reaches the photo as thin structure only (thin_overlay), as a pair of glasses does.
    `darkens`: added, the change reaches the photo only where it darkens the face (darker_only), as hair grown
    on skin does."""
    draw: Callable
    cut_face: bool = False
    keep: Optional[Callable] = None
    overlay: bool = False
    darkens: bool = False


REGIONS = {
    # The lips kept: grown over them, a mustache darkened the upper teeth of an open smile (38 photos, g9:
    # shown on 17 / 16 of 17 men without / with them kept, dlib identity 0.239 -> 0.230). Darker only: the
    # model draws a mustache with a lighter halo (see darker_only)
    "mustache": Region(_mustache, keep=_lips, darkens=True),
    # Not darker only: on the 38 photos it changed nothing a beard shows (identity 0.140 -> 0.143, shown 61% both)
    "beard": Region(_beard),
    # Glasses as frames over the face's own eyes: the model draws them with tinted lenses or a dark smudge
    # around the eyes, which the photo does not get (38 photos: see thin_overlay). Not darker only: the frames'
    # light edges are part of what reads as glasses (38 photos: shown 95% -> 86%, identity 0.286 -> 0.280)
    "eyeglasses": Region(_eyeglasses, overlay=True),
    # The nose kept (38 photos: dlib identity 0.262 -> 0.221, the largest 0.743 -> 0.424, shown on 94% both)
    "smiling": Region(_smiling, keep=_nose),
    "bangs": Region(_forehead),
    "wearing_hat": Region(_hat),
    "bald": Region(_above_brows, cut_face=True),
    "black_hair": Region(_hair, cut_face=True),
    "blond_hair": Region(_hair, cut_face=True),
    "pale_skin": Region(_whole_face),
    "young": Region(_whole_face),
    "male": Region(lambda p: _whole_face(p) + _hair(p)),
}


# A hair colour changes the hair, not what is around it: its region, grown and feathered, is then cut to
# the person as segmented (PERSON_MARGIN pixels past their outline, for the hair's soft edge), so that the
# background stays the photo's own.
ON_THE_PERSON = {"black_hair", "blond_hair"}
PERSON_MARGIN = 2


FEATHER = 3  # pixels of the aligned crop that a region's edge fades over


def region_mask(attributes, points, size, grow=4, feather=FEATHER, person=None):
    """Float (size, size) mask in [0, 1] covering the regions of `attributes` for a face with `points`
    (named landmarks in the size x size frame), grown by `grow` pixels and feathered by `feather`.
    `person`: (size, size) in [0, 1], the person's segmentation (FaceFinder.person); the regions in
    ON_THE_PERSON are cut to it."""
    check_names(list(REGIONS), attributes)
    on_person = [a for a in attributes if a in ON_THE_PERSON] if person is not None else []
    mask = _drawn_regions([a for a in attributes if a not in on_person], points, size, grow, feather)
    if on_person:
        near = Image.fromarray(np.where(person > 0.5, 255, 0).astype(np.uint8)).filter(
            ImageFilter.MaxFilter(2 * PERSON_MARGIN + 1)).filter(ImageFilter.GaussianBlur(PERSON_MARGIN / 2))
        cut = _drawn_regions(on_person, points, size, grow, feather) * (np.asarray(near, dtype=np.float32) / 255)
        mask = np.maximum(mask, cut)
    return mask


def overlay_mask(attributes, points, size, grow=4, feather=FEATHER):
    """Float (size, size) mask in [0, 1]: where the change of `attributes` is an overlay (Region.overlay), its
    region grown and feathered as region_mask's; 0 where no region asked for is one."""
    return _drawn_regions([a for a in attributes if REGIONS[a].overlay], points, size, grow, feather)


def darkening_mask(added, points, size, grow=4, feather=FEATHER):
    """Float (size, size) mask in [0, 1]: where the change of the `added` attributes may only darken the face
    (Region.darkens), their regions grown and feathered as region_mask's; 0 where none is one."""
    return _drawn_regions([a for a in added if REGIONS[a].darkens], points, size, grow, feather)


def _polygons(polygons, size, cut_face_of=None):
    """uint8 (size, size) image of the polygons filled (drawn supersampled, for smooth edges), less the face
    oval of the points `cut_face_of` when given."""
    scale = 4
    layer = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(layer)
    for polygon in polygons:
        draw.polygon([(x * scale, y * scale) for x, y in polygon], fill=255)
    if cut_face_of is not None:
        draw.polygon([(x * scale, y * scale) for x, y in _face_oval(cut_face_of)], fill=0)
    return layer.resize((size, size), Image.Resampling.BOX)


KEEP_FEATHER = 1.0  # pixels of the aligned crop over which a region fades out towards a part it keeps


def _fade_outwards(layer, radius, reach=0):
    """uint8 array of a PIL "L" layer, whole inside and fading out past its edge (blurred by `radius` after
    reaching `reach` pixels further), so that what it covers is never weakened."""
    spread = layer.filter(ImageFilter.MaxFilter(2 * int(reach) + 1)) if reach > 0 else layer
    return np.maximum(np.asarray(layer), np.asarray(spread.filter(ImageFilter.GaussianBlur(radius))))


def _drawn_regions(attributes, points, size, grow, feather):
    """The union of the attributes' regions, each grown, feathered and less what it keeps, so that one
    attribute's kept part (a mustache's lips) is still repainted where another's region covers it (a beard's)."""
    mask = np.zeros((size, size), dtype=np.float32)
    for attribute in attributes:
        region = REGIONS[attribute]
        drawn = _polygons(region.draw(points), size, cut_face_of=points if region.cut_face else None)
        if grow > 0:
            drawn = drawn.filter(ImageFilter.MaxFilter(2 * int(grow) + 1))
        one = (_fade_outwards(drawn, feather, reach=feather) if feather > 0 else np.asarray(drawn)) / np.float32(255)
        if region.keep is not None:
            one = one * (1 - _fade_outwards(_polygons(region.keep(points), size), KEEP_FEATHER) / np.float32(255))
        mask = np.maximum(mask, one)
    return mask


# ---------------------------------------------------------------------------------------------
# Editing aligned crops and photos
# ---------------------------------------------------------------------------------------------

def edit_crops(pipe, crops, masks, request, current=None, views=None, guidance=None):
    """Repaint aligned crops (uint8 (B, S, S, 3)) inside `masks` ((B, S, S) in [0, 1]), the attributes not
    changed held at the readings `current` ((B, A) in {-1, +1}) or, without them, left free. `views`: the
    framing.Framing each crop is, for a framed model (None: whole faces). `guidance`: instead of the
    request's (edit_until_shown's rungs).

    Returns uint8 crops whose pixels equal the input wherever the mask is 0. Each crop's result depends on
    it and the request's seed alone, not on the other crops of the batch.
    """
    asked = request.attributes(pipe.attributes)
    y = asked.condition(current).expand(len(crops), -1)
    reference = asked.reference(current).expand(len(crops), -1)
    source = None if current is None else current.float().expand(len(crops), -1)
    settings = request.settings if guidance is None else replace(request.settings, guidance=guidance)
    decoded = pipe.inpaint(to_tensor(crops), masks, y, reference, seeds=[request.seed] * len(crops),
                           strength=request.start, resample=request.resample, settings=settings,
                           start=request.trajectory, source=source,
                           framing=None if views is None else framing.features(views, crops.shape[1]))
    return composite(crops, to_uint8(decoded), masks)


def edit_until_shown(pipe, crops, masks, request, current, classifier, reconstructed, as_photo=None):
    """Guidance by need: every aligned crop edited at the request's first rung (EditRequest.rungs), then the
    crops whose change the `classifier` does not read as surely as on most real faces that have it
    (EditRequest.shown, the classifier's typical_logits) edited again from scratch at the next, and so on; a
    crop keeps the first rung that shows its change, or the last. The classifier reads each crop as its photo
    will show it: the crop with the change alone added (the edit less the crop's `reconstructed`, as
    paste_back adds it, and as `as_photo(edited, which)` shapes the crops `which`: photo_change), not the
    VAE's redrawing of the region. Returns (uint8 crops as edit_crops's or as_photo's, the guidance each took
    (B,)). A crop's result depends on it, its readings `current` and the seed alone."""
    rungs = request.rungs
    edited, taken = crops.copy(), np.full(len(crops), rungs[-1])
    pending = np.arange(len(crops))
    for rung, guidance in enumerate(rungs):
        edited[pending] = edit_crops(pipe, crops[pending], masks[pending], request, current[pending],
                                     guidance=guidance)
        if as_photo is not None:
            edited[pending] = as_photo(edited[pending], pending)
        taken[pending] = guidance
        if rung == len(rungs) - 1:
            break
        change = edited[pending].astype(np.int16) - reconstructed[pending]
        as_pasted = np.clip(crops[pending] + change, 0, 255).astype(np.uint8)
        logits = classifier.logits(to_tensor(as_pasted).to(classifier.device))
        shown = request.shown(logits, pipe.attributes, classifier.config.typical_logits)
        pending = pending[~np.array(shown, dtype=bool)]
        if not len(pending):
            break
    return edited, taken


# The widest structure, in pixels of the aligned crop, that an overlay's change keeps: a glasses frame is 1-4
# pixels wide at 128 px, a lens 15-20. Screened on 5 faces by eye and by the classifier (3-5 kept too little to
# read as glasses, 9 began to keep the lenses' tint), then on 38 photos: 5 at guidance 6 showed on 73%, 7 at 4 on 95%.
OVERLAY_WIDTH = 7


def overlay_width(zoom=1.0):
    """OVERLAY_WIDTH in a view zoomed `zoom` times (framing.Framing.zoom), odd."""
    return int(OVERLAY_WIDTH * zoom) // 2 * 2 + 1


def _opening(x, width):
    """Grey-level opening of (B, C, H, W) by a width x width square: what is left of x where a square fits."""
    eroded = -F.max_pool2d(-x, width, stride=1, padding=width // 2)
    return F.max_pool2d(eroded, width, stride=1, padding=width // 2)


def thin_structure(change, width=OVERLAY_WIDTH):
    """The part of a change (float (B, H, W, C)) narrower than `width` pixels: its top-hat, taken apart for
    what it lightens and what it darkens. A thin line keeps its full contrast; a broad patch (a tinted lens, a
    shadow) is dropped, and a line drawn over it keeps only what stands out of it."""
    d = torch.as_tensor(change, dtype=torch.float32).permute(0, 3, 1, 2)
    lighter, darker = d.clamp(min=0), (-d).clamp(min=0)
    thin = (lighter - _opening(lighter, width)) - (darker - _opening(darker, width))
    return thin.permute(0, 2, 3, 1).numpy()


def thin_overlay(edited, reconstructed, overlays, width=OVERLAY_WIDTH):
    """uint8 crops: `edited` with its change over `reconstructed` kept only as thin_structure, and only its
    brightness (the same on every channel), where `overlays` ((B, S, S) in [0, 1]) is 1; whole where it is 0.
    Glasses come out as neutral frames over the face's own eyes: the broad shading the model draws with them
    does not reach the photo, nor the colours it gives a line 1-4 pixels wide, which at 128 px are noise (green,
    brown or red blotches on the frames; 38 photos: shown 92 -> 95%, dlib identity 0.289 -> 0.286). Where the
    edit changed nothing, the result is `reconstructed`'s pixels, exactly."""
    if not overlays.any():
        return edited
    change = edited.astype(np.float32) - reconstructed
    weight = overlays[..., None].astype(np.float32)
    thin = thin_structure(change, width).mean(-1, keepdims=True)  # its brightness alone: see the docstring
    kept = change * (1 - weight) + thin * weight
    return np.clip(np.rint(reconstructed + kept), 0, 255).astype(np.uint8)


# Grey levels over which darker_only goes from keeping a change (where it darkens) to dropping it (where it
# lightens): no hard edge where the change crosses 0
DARKER_RAMP = 4


def darker_only(edited, reconstructed, darkening):
    """uint8 crops: `edited` with its change over `reconstructed` kept only where it darkens (its brightness,
    the mean over channels, below 0, faded over DARKER_RAMP grey levels) where `darkening` ((B, S, S) in
    [0, 1]) is 1; whole where it is 0. Hair grown on skin darkens it; the model draws a mustache with a
    lighter halo (the skin between the nose and the mustache, the lips' edge), which the photo does not get
    (38 photos: dlib identity median 0.192 -> 0.174, lower on 34, the same men shown). Where the edit
    changed nothing, the result is `reconstructed`'s pixels, exactly."""
    if not darkening.any():
        return edited
    change = edited.astype(np.float32) - reconstructed
    lighter = np.clip(0.5 + change.mean(-1, keepdims=True) / DARKER_RAMP, 0, 1)  # 1 where it lightens
    kept = change * (1 - darkening[..., None] * lighter)
    return np.clip(np.rint(reconstructed + kept), 0, 255).astype(np.uint8)


def photo_change(edited, reconstructed, overlays, darkening, width=OVERLAY_WIDTH):
    """uint8 crops: `edited` with its change over `reconstructed` shaped as the photo gets it: thin_overlay
    where `overlays` says, darker_only where `darkening` says (both (B, S, S) in [0, 1])."""
    return darker_only(thin_overlay(edited, reconstructed, overlays, width), reconstructed, darkening)


def composite(crops, generated, masks):
    """uint8 crops with `generated` blended in where the masks are above 0, the crops' own pixels elsewhere."""
    m = masks[..., None]
    out = np.rint(crops * (1 - m) + generated * m).astype(np.uint8)
    return np.where(m > 0, out, crops)


def reconstruct_crops(pipe, crops, masks):
    """The crops with their own reconstruction through the VAE inside the masks: what an edit that changes
    nothing would give, against which an edit's change is measured (paste_back)."""
    return composite(crops, to_uint8(pipe.reconstruct(to_tensor(crops))), masks)


# New content is super-resolved before it reaches the photo where the face there is at least this many times
# the crop's size: below that, a 4x network adds little that the photo could show.
UPSCALE_FROM = 1.5
UPSCALE_MARGIN = 12  # crop pixels of context around the mask's box, for the network's receptive field


def load_upscaler(request, device):
    """The super-resolution network an edit uses (upscale.load_upscaler), or None when it asks for none."""
    if not request.upscale:
        return None
    from . import upscale

    return upscale.load_upscaler(device=device)


def mask_box(mask):
    """(left, top, right, bottom), right and bottom exclusive: the box of the pixels where `mask` is above 0,
    or None when there are none."""
    rows, cols = np.nonzero(mask > 0)
    if not len(rows):
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def super_resolve(upscaler, edited, reconstructed, mask, precision="fp32"):
    """The edited crop and its reconstruction (uint8 (S, S, 3)) at the upscaler's scale, through the network
    over the box around where `mask` is above 0 (with UPSCALE_MARGIN pixels of context), both 0 elsewhere:
    paste_back takes their difference, so the new content reaches the photo at 4x the crop's detail."""
    from .upscale import upscale_tensor

    scale, size = upscaler.scale, mask.shape[0]
    out = np.zeros((2, size * scale, size * scale, 3), dtype=np.uint8)
    box = mask_box(mask)
    if box is None:
        return out[0], out[1]
    left, top = (max(v - UPSCALE_MARGIN, 0) for v in box[:2])
    right, bottom = (min(v + UPSCALE_MARGIN, size) for v in box[2:])
    pair = np.stack([edited, reconstructed])[:, top:bottom, left:right]
    x = torch.from_numpy(pair).permute(0, 3, 1, 2).float() / 255
    y = upscale_tensor(upscaler, x, tile=0, precision=precision)
    out[:, top * scale:bottom * scale, left * scale:right * scale] = \
        (y.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return out[0], out[1]


def photo_window(mask, matrix, photo_size, pad=2):
    """(left, top, right, bottom): the part of the photo that the crop's mask (above 0) maps back onto,
    `pad` pixels more, within the photo; None when the mask is empty."""
    box = mask_box(mask)
    if box is None:
        return None
    inverse = invert(matrix)
    left, top, right, bottom = box
    corners = np.array([[left, top], [right, top], [left, bottom], [right, bottom]], dtype=np.float64)
    xy = corners @ inverse[:, :2].T + inverse[:, 2]
    left, top = np.maximum(np.floor(xy.min(0)).astype(int) - pad, 0)
    right, bottom = np.minimum(np.ceil(xy.max(0)).astype(int) + pad, photo_size)
    return int(left), int(top), int(right), int(bottom)


def paste_back(photo, edited, reconstructed, mask, matrix):
    """Put the change an edited crop makes into the photo (PIL RGB) at the photo's own resolution: the
    difference between the edited crop and the crop's own reconstruction (`reconstructed`), warped back and
    added to the photo's pixels inside the warped mask. Where the model changed nothing, the photo keeps its
    own detail; the VAE's error never reaches it. Pixels whose warped mask is 0 are the photo's own, exactly.
    `edited` and `reconstructed` may be k times the mask's size (super_resolve); `matrix` maps the photo to
    the mask's frame. Only the window of the photo the mask reaches is warped (photo_window): a 12-MP photo
    costs what its face does. Returns (uint8 photo, uint8 mask in photo space)."""
    original = np.asarray(photo)
    result, photo_mask = original.copy(), np.zeros(original.shape[:2], dtype=np.uint8)
    window = photo_window(mask, matrix, photo.size)
    if window is None:
        return result, photo_mask
    left, top, right, bottom = window
    size = (right - left, bottom - top)
    to_crop = matrix @ np.array([[1, 0, left], [0, 1, top], [0, 0, 1]], dtype=np.float64)  # window -> crop
    k = edited.shape[0] / mask.shape[0]
    fine = invert(np.diag([k, k]) @ to_crop)  # the k-times-larger crop's frame -> the window
    change = np.asarray(warp(Image.fromarray(edited), fine, size), dtype=np.float32) - np.asarray(
        warp(Image.fromarray(reconstructed), fine, size), dtype=np.float32)
    weight = np.asarray(warp(Image.fromarray(np.rint(mask * 255).astype(np.uint8)), invert(to_crop), size,
                             Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255
    here = original[top:bottom, left:right]
    blended = np.clip(np.rint(here + change * weight), 0, 255).astype(np.uint8)
    result[top:bottom, left:right] = np.where(weight > 0, blended, here)
    photo_mask[top:bottom, left:right] = np.rint(weight[..., 0] * 255).astype(np.uint8)
    return result, photo_mask


# ---------------------------------------------------------------------------------------------
# Photos and folders
# ---------------------------------------------------------------------------------------------

class NoFaceFound(FacegenError):
    kind = Outcome.NO_FACE  # what FileResult calls it


@dataclass
class PreparedPhoto:
    path: Path
    target: Path
    photo: Image.Image  # RGB, EXIF orientation applied: what the model sees
    original: Image.Image  # the same picture in its own mode (CMYK, L, RGBA, ...), what is written back
    save_options: dict  # how the source was encoded: JPEG tables, EXIF, ICC profile
    deep: Optional[np.ndarray]  # a 16-bit RGB(A) PNG's own values (images.read_deep_rgb), else None
    faces: np.ndarray  # (F, S, S, 3) one aligned crop per face to edit, as the classifier reads it
    crops: np.ndarray  # (F, S, S, 3) the view of each face the model repaints (the aligned crop, or zoomed)
    views: list  # the framing.Framing of each of those views
    matrices: list  # photo -> view
    masks: np.ndarray  # (F, S, S) in [0, 1], in the views
    overlays: np.ndarray  # (F, S, S) in [0, 1]: where the change is kept as thin structure (overlay_mask)
    darkening: np.ndarray  # (F, S, S) in [0, 1]: where the change is kept where it darkens (darkening_mask)


def face_view(photo, points, matrix, request, size, zoom):
    """(the view of an aligned face (its points, matrix photo -> crop) that an edit repaints, its Framing,
    the matrix photo -> view): with `zoom`, the closest view that holds the region of the change and that
    the photo's own pixels hold (framing.covering), else the aligned crop itself (None for the view: the
    caller has it)."""
    whole = framing.Framing.whole(size)
    if not zoom:
        return None, whole, matrix
    box = mask_box(region_mask(request.regions, points, size, grow=request.mask_grow))
    view = framing.covering(box, face_scale(matrix), size) if box else whole
    if view == whole:
        return None, whole, matrix
    view_matrix = view.of(matrix, size)
    return frame(photo, view_matrix, size), view, view_matrix


def prepare_photo(path, target, finder, request, size, face=None, zoom=False):
    """Read a photo, find its faces and align them (PreparedPhoto); `zoom`: repaint each in the closest view
    of its region (face_view), for a framed model."""
    original, save_options = read_photo(path)
    photo = to_rgb(original)
    faces = finder(np.asarray(photo))
    if not faces:
        raise NoFaceFound("no face found")
    if face is not None:
        if face >= len(faces):
            raise FacegenError(f"--face {face} asked for, but only {len(faces)} face(s) found")
        faces = [faces[face]]
    aligned, crops, views, matrices, masks, overlays, darkening = [], [], [], [], [], [], []
    for points in faces:
        crop, matrix, aligned_points = align_face(photo, points, size)
        zoomed, view, matrix = face_view(photo, aligned_points, matrix, request, size, zoom)
        if zoomed is not None:  # the region drawn in the view, grown and feathered as far in the face as in the crop
            aligned_points = transform_points(aligned_points, view.matrix(size))
        seen = crop if zoomed is None else zoomed
        person = finder.person(seen) if ON_THE_PERSON & set(request.regions) else None
        grow, feather = round(request.mask_grow * view.zoom), round(FEATHER * view.zoom)
        masks.append(region_mask(request.regions, aligned_points, size, grow=grow, feather=feather, person=person))
        overlays.append(overlay_mask(request.regions, aligned_points, size, grow=grow, feather=feather))
        darkening.append(darkening_mask(request.add, aligned_points, size, grow=grow, feather=feather))
        aligned.append(crop)
        crops.append(seen)
        views.append(view)
        matrices.append(matrix)
    return PreparedPhoto(Path(path), Path(target), photo, original, save_options, read_deep_rgb(path),
                         np.stack(aligned), np.stack(crops), views, matrices, np.stack(masks), np.stack(overlays),
                         np.stack(darkening))


# Changes the training data can hardly support: (added attribute, attribute read, its reading) -> why.
UNSUPPORTED = {("mustache", "male", -1): "CelebA has almost no women with a mustache",
               ("beard", "male", -1): "CelebA has almost no women with a beard"}


def warn_unsupported(prepared, request, attributes, current):
    """One line per face whose change the data can hardly support (a mustache on a face read as a woman's):
    the edit may not show there."""
    faces = [(p.path, k) for p in prepared for k in range(len(p.crops))]
    for (added, read, value), why in UNSUPPORTED.items():
        if added in request.add and read in attributes:
            for (path, k), reading in zip(faces, current[:, attributes.index(read)].tolist()):
                if reading == value:
                    log.warning(f"{path}: face {k} reads as {'not ' if value < 0 else ''}{read}; {why}, so "
                                f"the {added} may not show")


@dataclass
class EditedPhoto:
    pixels: np.ndarray  # uint8 (H, W, 3): the photo with every face's change added
    mask: np.ndarray  # uint8 (H, W): where it may differ from the photo
    guidance: list  # the guidance each face was edited at


def edit_prepared(pipe, prepared, request, classifier=None, upscaler=None):
    """Edit every face of several prepared photos in one batch; returns [EditedPhoto].
    With a `classifier`, the attributes not asked about are held at its readings of each face and, unless a
    guidance is given, each face takes the least of the request's rungs that shows the change
    (edit_until_shown; on whole faces: a framed model's zoomed views are edited at the full guidance).
    With an `upscaler` (upscale.load_upscaler), the new content of a face at least UPSCALE_FROM times the
    crop's size in its photo is super-resolved first (super_resolve)."""
    crops = np.concatenate([p.crops for p in prepared])
    masks = np.concatenate([p.masks for p in prepared])
    overlays = np.concatenate([p.overlays for p in prepared])
    darkening = np.concatenate([p.darkening for p in prepared])
    faces = np.concatenate([p.faces for p in prepared])
    current = classifier.predict(to_tensor(faces).to(classifier.device)) if classifier is not None else None
    if current is not None:
        warn_unsupported(prepared, request, pipe.attributes, current)
    views = [view for p in prepared for view in p.views] if pipe.dit.framed else None
    reconstructed = reconstruct_crops(pipe, crops, masks)
    if current is not None and views is None:
        edited, guidance = edit_until_shown(
            pipe, crops, masks, request, current, classifier, reconstructed,
            as_photo=lambda some, k: photo_change(some, reconstructed[k], overlays[k], darkening[k]))
    else:
        edited, guidance = edit_crops(pipe, crops, masks, request, current, views), [request.rungs[-1]] * len(crops)
        if views is None:
            edited = photo_change(edited, reconstructed, overlays, darkening)
        else:  # in a zoomed view a frame is more pixels wide
            edited = np.concatenate([photo_change(edited[k:k + 1], reconstructed[k:k + 1], overlays[k:k + 1],
                                                  darkening[k:k + 1], overlay_width(view.zoom))
                                     for k, view in enumerate(views)])
    results, start = [], 0
    for p in prepared:
        photo, total_mask = p.photo, np.zeros(p.photo.size[::-1], dtype=np.uint8)
        faces = slice(start, start + len(p.crops))
        for crop, own, mask, matrix in zip(edited[faces], reconstructed[faces], p.masks, p.matrices):
            if upscaler is not None and face_scale(matrix) >= UPSCALE_FROM:
                crop, own = super_resolve(upscaler, crop, own, mask, pipe.precision)
            pixels, photo_mask = paste_back(photo, crop, own, mask, matrix)
            photo, total_mask = Image.fromarray(pixels), np.maximum(total_mask, photo_mask)
        results.append(EditedPhoto(np.asarray(photo), total_mask, [float(g) for g in guidance[faces]]))
        start += len(p.crops)
    return results


def mask_path(target):
    """Where --save-mask writes the mask of the output `target`: NAME.EXT.mask.png, one per output name
    (x.jpg and x.png do not share one)."""
    return Path(target).with_name(Path(target).name + ".mask.png")


def edit_record(pipe, request, guidance):
    """What an edit did to a photo, as its metadata records it (images.with_edit_recorded): `guidance`, the
    guidance each of its faces was edited at (EditedPhoto)."""
    settings = request.settings
    return {"add": list(request.add), "remove": list(request.remove), "faces": len(guidance),
            "trajectory": request.trajectory, "guidance": guidance, "steps": settings.steps,
            "seed": request.seed, "model": pipe.path.name if pipe.path else None, "fingerprint": pipe.fingerprint,
            "version": __version__}


def save_edited(prepared, pixels, mask, record=None, save_mask=False, exclusive=False):
    """Write the edited photo atomically, as its source was: same format and mode, the source's JPEG
    tables, EXIF, XMP, ICC profile and file permissions; pixels outside the mask are the source's own (for a
    JPEG, re-encoded with its own tables). `record` (edit_record) is added to the edits its metadata lists
    (a PNG text chunk; XMP in JPEG, WebP and TIFF). The mask goes beside it if asked (mask_path), first.
    exclusive: never replace a file there, even one another run made meanwhile."""
    if save_mask:
        save_image(Image.fromarray(mask), mask_path(prepared.target), exclusive=exclusive)
    options = with_edit_recorded(prepared.save_options, record) if record else prepared.save_options
    if prepared.deep is not None:  # 16-bit RGB: the change added at 16 bits, every value outside kept
        deep = prepared.deep
        change = (pixels.astype(np.int32) - np.asarray(prepared.photo, dtype=np.int32)) * 257
        edited = np.clip(deep[..., :3].astype(np.int32) + change, 0, 65535).astype(np.uint16)
        out = deep.copy()
        out[..., :3] = np.where(mask[..., None] > 0, edited, deep[..., :3])
        return save_deep_rgb(out, prepared.target, text=options.get("text"), mode_from=prepared.path,
                             exclusive=exclusive)
    original = prepared.original
    if original.mode.startswith("I"):  # deep grey: the edit's 8 bits spread over the original's range
        deep = np.asarray(original)
        grey = np.asarray(Image.fromarray(pixels).convert("L")).astype(deep.dtype) * deep_grey_scale(original)
        result = Image.fromarray(np.where(mask > 0, grey, deep).astype(deep.dtype))
    else:
        changed = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8))
        result = Image.composite(Image.fromarray(pixels).convert(original.mode), original, changed)
    if original.mode in ("RGBA", "LA"):
        result.putalpha(original.getchannel("A"))
    save_image(result, prepared.target, save_options=options, mode_from=prepared.path, exclusive=exclusive)
    return prepared.target


def without_masks(files):
    """(the inputs less the NAME.mask.png files that --save-mask wrote: they are not photos, how many)."""
    photos = [(path, relative) for path, relative in files if not path.name.endswith(".mask.png")]
    return photos, len(files) - len(photos)


def edit_photos(pipe, files, request, out=None, *, classifier=None, face=None, save_mask=False, overwrite=False,
                batch_size=8):
    """Edit every (path, relative) of `files` into OUT/relative, or over the photo itself when `out` is
    None; yields one FileResult per photo, a bad one (unreadable, no face, ...) reported and passed over.

    Photos are prepared (read, faces found and aligned) a batch at a time, and every face of a batch is
    repainted in one sampling run on the model's device. With a classifier, the attributes not asked
    about are held at its readings of each face, so that only the asked ones change.
    """
    finder, upscaler = FaceFinder(), load_upscaler(request, pipe.device)
    try:
        for start in range(0, len(files), batch_size):
            prepared = []
            for path, relative in files[start:start + batch_size]:
                photo, problem = attempt(path, lambda: prepare_photo(
                    path, output_path(path, relative, out, overwrite), finder, request, pipe.info.image_size, face,
                    zoom=request.zoom and pipe.dit.framed))
                if problem:
                    yield problem
                else:
                    prepared.append(photo)
            if prepared:
                for photo, edited in zip(prepared, edit_prepared(pipe, prepared, request, classifier, upscaler)):
                    record = edit_record(pipe, request, edited.guidance)
                    saved, problem = attempt(photo.path, lambda: save_edited(
                        photo, edited.pixels, edited.mask, record, save_mask,
                        exclusive=out is not None and not overwrite))
                    yield problem or FileResult(photo.path, saved)
    finally:
        finder.close()
