"""What a plain pair of glasses costs in dlib's identity distance: thin dark frames drawn on each photo's largest
face with PIL, nothing else changed, measured as `facegen eval edits` measures an edit.

    python scripts/drawn_glasses.py PHOTOS... --out drawn-glasses [--line 70]

Frames: a rounded rectangle around each eye (1.9 eye widths wide, 1.15 high) and a bridge, lines of a
1/LINE of the face's width (temple to temple), dark grey. Prints the identity median and largest (original vs
with frames, on dlib's face box) and how often the attribute classifier reads glasses on the face found again;
writes OUT/rows.json and the photos with frames. Every pixel off the drawn lines is the photo's own, so the
distance is what dlib reads of glasses alone: the least any edit that adds visible glasses can score.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from facegen_cli.edit import without_masks
from facegen_cli.files import collect_inputs, save_image
from facegen_cli.identity import FaceEmbedder
from facegen_cli.images import read_photo, to_rgb
from facegen_cli.landmarks import FaceFinder
from facegen_cli.photo_eval import read_face
from facegen_cli.pipeline import FacegenPipeline

FRAME = (30, 30, 30)


def draw_frames(photo, points, line):
    """The photo (PIL RGB) with frames drawn around the eyes of the face with `points` (landmarks.MESH_POINTS)."""
    out = photo.copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(np.ptp([points[f"jaw_{k}"][0] for k in range(9)]) / line))
    boxes = []
    for side in ("left", "right"):
        outer, inner, centre = (np.asarray(points[f"{side}_eye{part}"], dtype=float) for part in ("_outer", "_inner", ""))
        eye = np.linalg.norm(outer - inner)
        boxes.append((centre[0] - 0.95 * eye, centre[1] - 0.55 * eye, centre[0] + 0.95 * eye, centre[1] + 0.6 * eye))
    for box in boxes:
        draw.rounded_rectangle(box, radius=(box[2] - box[0]) / 5, outline=FRAME, width=width)
    left, right = sorted(boxes)
    draw.line([(left[2], (left[1] + left[3]) / 2 - 0.1 * (left[3] - left[1])),
               (right[0], (right[1] + right[3]) / 2 - 0.1 * (right[3] - right[1]))], fill=FRAME, width=width)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="+", help="photos or folders of photos, as facegen eval edits takes them")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--line", type=float, default=70, help="frame lines 1/LINE of the face's width")
    parser.add_argument("--model", default="faces", help="whose attribute classifier reads the glasses")
    args = parser.parse_args()

    pipe = FacegenPipeline.load(args.model, "cpu", "fp32")
    classifier, embedder, finder = pipe.load_classifier(), FaceEmbedder(), FaceFinder()
    glasses = pipe.attributes.index("eyeglasses")
    files, problems = collect_inputs(args.photos)
    for problem in problems:
        print(problem)
    rows = []
    try:
        for path in sorted(path for path, _ in without_masks(files)[0]):
            photo = to_rgb(read_photo(path)[0])  # EXIF orientation applied, as the edits see the photo
            pixels = np.asarray(photo)
            before, points, _ = read_face(finder, classifier, pixels, pipe.info.image_size)
            if points is None:
                continue
            framed = draw_frames(photo, points, args.line)
            after = read_face(finder, classifier, np.asarray(framed), pipe.info.image_size)[0]
            rows.append({"photo": path.name, "had": bool(before[glasses] == 1),
                         "shown": bool(after is not None and after[glasses] == 1),
                         "identity": round(embedder.distance(pixels, np.asarray(framed), embedder.box(pixels, points)), 4)})
            save_image(framed, args.out / f"{path.stem}.jpg")
    finally:
        finder.close()
    identity = [r["identity"] for r in rows]
    without = [r for r in rows if not r["had"]]
    summary = {"faces": len(rows), "line": args.line, "identity_median": round(float(np.median(identity)), 3),
               "identity_max": round(max(identity), 3), "above_0.45": sum(i > 0.45 for i in identity),
               "shown": round(sum(r["shown"] for r in without) / len(without), 3), "faces_without": len(without)}
    (args.out / "rows.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
