"""Before/after crops of every edit kind on real photos, as docs/<name>/edit-<attribute>.png.

    python scripts/edit_examples.py ../shared/fixtures/photos --model faces --out docs/faces-edit

Each figure: row 1 the aligned face before, row 2 after `facegen edit --add <attribute>` (the same library
calls as the command, default settings), one column per face found in the photos (the first face of each).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from facegen_cli.edit import REGIONS, NoFaceFound, edit_prepared, prepare_photo
from facegen_cli.edit_request import EditRequest
from facegen_cli.evaluate import attribute_grid
from facegen_cli.files import save_image
from facegen_cli.images import to_tensor
from facegen_cli.landmarks import FaceFinder, frame
from facegen_cli.pipeline import FacegenPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    pipe = FacegenPipeline.load(args.model)
    classifier = pipe.load_classifier()
    finder = FaceFinder()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    size = pipe.info.image_size
    for attribute in REGIONS:
        request = EditRequest(add=(attribute,), sample=pipe.sample)
        prepared = []
        for path in photos:
            try:
                prepared.append(prepare_photo(path, path, finder, request, size, face=0))
            except NoFaceFound:
                continue
        results = edit_prepared(pipe, prepared, request, classifier)
        before = np.concatenate([p.crops for p in prepared])
        after = np.stack([frame(Image.fromarray(edited.pixels), p.matrices[0], size)
                          for p, edited in zip(prepared, results)])
        rows = to_tensor(np.stack([before, after]).reshape(-1, size, size, 3)).view(2, len(before), 3, size, size)
        grid = attribute_grid(rows, columns=len(before))
        print(save_image(Image.fromarray(grid), args.out / f"edit-{attribute}.png"), flush=True)
    finder.close()


if __name__ == "__main__":
    main()
