"""Edits measured on photos at their own resolution (`facegen eval edits`): what a user sees, not the
128-px aligned crop the model works in.

For each photo and each edit kind the photo's largest face is edited with the shipped defaults, as
`facegen edit --add KIND` does, and again with nothing asked over the same region (the no-op floor: what
the pipeline costs a photo by itself). Per edit:

    texture        high-frequency energy inside the edited region over that in a band of face around it,
                   at the photo's pixels, divided by the same ratio on the unedited photo (1.0: as sharp
                   and grainy as the photo itself there)
    identity       dlib's embedding distance, original vs edited (0.6: another person)
    shown          the classifier reads the attribute on the edited face, found and aligned again in the
                   edited photo
    others_kept    the other readings unchanged (those the added attribute rules out left aside)
    changed_outside  pixels changed outside the mask (0)

OUT/report.json, OUT/report.md (medians per kind) and OUT/crops/KIND/NAME.png (before | after, the face at
the photo's own pixels).
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .attributes import exclusive_pairs
from .edit import NoFaceFound, edit_prepared, load_upscaler, prepare_photo
from .edit_request import EditRequest, edit_sample
from .errors import FacegenError
from .evaluate import high_frequency_ratio
from .files import atomic_path, save_image, write_json
from .identity import FaceEmbedder, face_box
from .images import to_tensor
from .landmarks import FaceFinder, align_face

LOCAL_KINDS = ("mustache", "beard", "eyeglasses", "smiling", "bangs", "wearing_hat")
WHOLE_FACE_KINDS = ("young", "male", "pale_skin")


@dataclass
class PhotoEdit:
    """One photo's largest face, edited one way (or not at all: noop)."""
    photo: str
    kind: str
    noop: bool
    face_width: float  # pixels between the temples in the photo
    texture: float
    identity: float
    had: bool  # the classifier read the attribute on the unedited face already
    shown: bool
    others_kept: float
    changed_outside: int
    seconds: float
    guidance: float  # what the face was edited at (edit.edit_until_shown)


def largest_face(faces):
    return max(range(len(faces)), key=lambda i: np.ptp([faces[i][f"jaw_{k}"][0] for k in range(9)]))


def read_face(finder, classifier, pixels, size):
    """The classifier's readings (A,) of the largest face found in an RGB photo, its landmarks and its index
    among the faces found (None, None, None where there is none)."""
    faces = finder(pixels)
    if not faces:
        return None, None, None
    index = largest_face(faces)
    crop = align_face(Image.fromarray(pixels), faces[index], size)[0]
    return classifier.predict(to_tensor(crop[None]).to(classifier.device))[0], faces[index], index


def texture_ratio(pixels, mask, face_width):
    """high_frequency_ratio at the photo's scale: the band around the region is 1/16 of the face wide."""
    ys, xs = np.nonzero(mask)
    pad = int(face_width / 8) + 2
    top, left = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
    window = (slice(top, ys.max() + pad), slice(left, xs.max() + pad))
    return high_frequency_ratio(pixels[window][None], mask[window][None] / 255, ring=max(2, int(face_width / 16)))


def measure_one(pipe, classifier, embedder, finder, path, kind, noop, request, upscaler=None):
    """(a PhotoEdit, the photo as edited (RGB, EXIF orientation applied), the edited pixels, the face's
    landmarks), or None when no face is found."""
    asked = replace(request, add=() if noop else (kind,), repaint=(kind,))
    size = pipe.info.image_size
    try:
        start = time.perf_counter()
        prepared = prepare_photo(path, path, finder, asked, size, zoom=asked.zoom and pipe.dit.framed)
    except NoFaceFound:
        return None
    photo = np.asarray(prepared.photo)
    before, points, face = read_face(finder, classifier, photo, size)
    [edited] = edit_prepared(pipe, [prepared], asked, classifier, upscaler)
    pixels, mask = edited.pixels, edited.mask
    seconds = time.perf_counter() - start
    after = read_face(finder, classifier, pixels, size)[0]
    index = pipe.attributes.index(kind)
    compared = ~exclusive_pairs(pipe.attributes)[index]
    compared[index] = False
    width = float(np.ptp([points[f"jaw_{i}"][0] for i in range(9)]))
    result = PhotoEdit(
        photo=Path(path).name, kind=kind, noop=noop, face_width=round(width, 1),
        texture=round(texture_ratio(pixels, mask, width) / texture_ratio(photo, mask, width), 4),
        identity=round(embedder.distance(photo, pixels, embedder.box(photo, points)), 4),
        had=bool(before[index] == 1), shown=bool(after is not None and after[index] == 1),
        others_kept=round(float((after[compared] == before[compared]).float().mean()) if after is not None else 0.0, 4),
        changed_outside=int((pixels != photo).any(-1)[mask == 0].sum()), seconds=round(seconds, 2),
        guidance=edited.guidance[face])
    return result, photo, pixels, points


BEFORE_AFTER_GAP = 4  # white pixels between before and after


def before_after(photo, pixels, points):
    """The face at the photo's own pixels, before | after."""
    left, top, right, bottom = face_box(points)
    half = 0.8 * (right - left)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    box = tuple(int(round(v)) for v in (cx - half, cy - 1.2 * half, cx + half, cy + 0.9 * half))
    a, b = Image.fromarray(photo).crop(box), Image.fromarray(pixels).crop(box)
    both = Image.new("RGB", (a.width * 2 + BEFORE_AFTER_GAP, a.height), (255, 255, 255))
    both.paste(a, (0, 0))
    both.paste(b, (a.width + BEFORE_AFTER_GAP, 0))
    return both


def measure_photo_edits(pipe, classifier, photos, out, *, kinds=LOCAL_KINDS + WHOLE_FACE_KINDS, request=None,
                        progress=None):
    """Edit and measure every photo of `photos` (paths) for each of `kinds`, and the no-op floor; writes
    OUT/report.json and OUT/report.md after each kind (a stopped run keeps the kinds it finished) and
    OUT/crops/. Returns the PhotoEdits."""
    if classifier is None:
        raise FacegenError("measuring edits needs the model's attribute classifier (MODEL/classifier)")
    request = request or EditRequest(sample=edit_sample(pipe.sample))
    embedder, finder, upscaler = FaceEmbedder(), FaceFinder(), load_upscaler(request, pipe.device)
    out = Path(out)
    results = []
    task = progress.add_task("measuring edits", total=len(photos) * len(kinds) * 2) if progress else None
    try:
        for kind in kinds:
            for path in photos:
                for noop in (False, True):
                    measured = measure_one(pipe, classifier, embedder, finder, path, kind, noop, request, upscaler)
                    if progress:
                        progress.advance(task)
                    if measured is None:
                        continue
                    result, photo, pixels, points = measured
                    results.append(result)
                    if not noop:
                        save_image(before_after(photo, pixels, points), out / "crops" / kind / f"{Path(path).stem}.png")
            write_report(out, results)
    finally:
        finder.close()
    return results


def write_report(out, results):
    summary = summarise(results)
    write_json(out / "report.json", {"edits": [asdict(r) for r in results], "summary": summary})
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(report_markdown(summary))


def summarise(results):
    """{kind: {edited: medians and rates, noop: the same for the no-op floor}}."""
    summary = {}
    for kind in dict.fromkeys(r.kind for r in results):
        summary[kind] = {}
        for noop, name in ((False, "edited"), (True, "noop")):
            rows = [r for r in results if r.kind == kind and r.noop == noop]
            if not rows:
                continue
            without = [r for r in rows if not r.had]
            summary[kind][name] = {
                "faces": len(rows),
                "faces_without": len(without),  # read without the attribute before: where "shown" is counted
                "texture_median": round(float(np.nanmedian([r.texture for r in rows])), 3),
                "identity_median": round(float(np.median([r.identity for r in rows])), 3),
                "identity_max": round(max(r.identity for r in rows), 3),
                "shown": round(sum(r.shown for r in without) / len(without), 3) if without else None,
                "others_kept": round(float(np.mean([r.others_kept for r in rows])), 3),
                "changed_outside": sum(r.changed_outside for r in rows),
                "seconds_median": round(float(np.median([r.seconds for r in rows])), 2),
                "guidance_median": float(np.median([r.guidance for r in rows]))}
    return summary


def percent(fraction):
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def report_markdown(summary):
    lines = ["# Edits at the photo's own resolution", "",
             "Per kind: the edit (`facegen edit --add KIND`, defaults) and, below it, the no-op floor (the same "
             "region repainted with nothing asked). Texture: 1.0 = as sharp as the photo there. Identity: dlib "
             "distance, original vs edited (0.6 = another person). Shown: the classifier reads the attribute on "
             "the face found again in the edited photo, of the faces read without it before (their number in "
             "brackets).", "",
             "| kind | | faces | texture (median) | identity median | identity max | shown | others kept | "
             "px changed outside | s per photo | guidance (median) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, rows in summary.items():
        for name, r in rows.items():
            lines.append(f"| {kind} | {name} | {r['faces']} | {r['texture_median']:.2f} | {r['identity_median']:.3f} | "
                         f"{r['identity_max']:.3f} | {percent(r['shown'])} ({r['faces_without']}) | {100 * r['others_kept']:.0f}% | "
                         f"{r['changed_outside']} | {r['seconds_median']:.1f} | {r['guidance_median']:g} |")
    return "\n".join(lines) + "\n"
