"""One figure of before | after crops at the photos' own pixels, from a `facegen eval edits` report folder.

    python scripts/photo_figure.py edit-report male --out docs/faces-edit/photos/photo-male.jpg
    python scripts/photo_figure.py old-report eyeglasses --then new-report --out before-after.jpg

Stacks OUT/crops/KIND/NAME.png (as eval edits writes them) top to bottom on white, 4 pixels apart, for the
photos named (default: the 6 shared fixture photos and two CelebA men, as docs/faces-edit/photo-eval.md shows).
With --then, each row goes on with the edited half of the same crop in each later report (original | edit | edit).
"""

import argparse
from pathlib import Path

from PIL import Image

from facegen_cli.files import save_image
from facegen_cli.photo_eval import BEFORE_AFTER_GAP as GAP  # rows and columns as far apart as a crop's halves

PHOTOS = ("0-f1-su-ph", "0-f15-hao-ph", "15-f13-anc-ph", "45-m7-di-ph", "multi_face", "single_face", "184041", "183854")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="an eval edits --out folder")
    parser.add_argument("kind")
    parser.add_argument("--photos", nargs="+", default=PHOTOS, help="crop names, without .png")
    parser.add_argument("--then", type=Path, nargs="*", default=[], help="later reports of the same photos")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    crops = [row(args.kind, name, [args.report, *args.then]) for name in args.photos]
    figure = Image.new("RGB", (max(c.width for c in crops), sum(c.height for c in crops) + GAP * (len(crops) - 1)),
                       "white")
    top = 0
    for crop in crops:
        figure.paste(crop, (0, top))
        top += crop.height + GAP
    save_image(figure, args.out)
    print(args.out)


def row(kind, name, reports):
    """The first report's before | after crop of `name`, then the after half of each later report's."""
    pairs = [Image.open(report / "crops" / kind / f"{name}.png").convert("RGB") for report in reports]
    half = (pairs[0].width - GAP) // 2
    out = Image.new("RGB", (pairs[0].width + (half + GAP) * (len(pairs) - 1), pairs[0].height), "white")
    out.paste(pairs[0], (0, 0))
    for k, pair in enumerate(pairs[1:], start=1):
        out.paste(pair.crop((pair.width - half, 0, pair.width, pair.height)), (pairs[0].width + GAP + (k - 1) * (half + GAP), 0))
    return out


if __name__ == "__main__":
    main()
