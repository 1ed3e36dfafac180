"""Identity distance: dlib's face-recognition network (a 128-d embedding; two photos of one person are
usually under 0.6 apart), independent of everything facegen trains. It measures whether an edit kept the
person; it is never a training signal. An optional extra: `pip install -e ".[identity]"` (dlib-bin and
face-recognition-models, whose files are read from the installed package).
"""

import importlib.util
from pathlib import Path

import numpy as np

from .errors import FacegenError

def _model_file(name):
    # The package's __init__ imports pkg_resources, which current setuptools no longer ships: find its
    # folder without running it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacegenError('identity distances need the identity extra: pip install -e ".[identity]"')
    return str(Path(spec.submodule_search_locations[0]) / "models" / name)


class FaceEmbedder:
    """embed(photo, box) -> the 128-d dlib embedding of the face in `box` (left, top, right, bottom) of an
    RGB uint8 photo, aligned by dlib's 5-point predictor as dlib's own examples do."""

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise FacegenError('identity distances need the identity extra: pip install -e ".[identity]"') from None
        self.dlib = dlib
        self.shape = dlib.shape_predictor(_model_file("shape_predictor_5_face_landmarks.dat"))
        self.network = dlib.face_recognition_model_v1(_model_file("dlib_face_recognition_resnet_model_v1.dat"))
        self.detector = dlib.get_frontal_face_detector()

    def box(self, photo, points):
        """dlib's own detection of the face whose eyes are at `points`' (the box its shape predictor was
        trained on: a box drawn from other landmarks makes the embedding move 0.1-0.3 for 2 grey levels of
        noise, dlib's 0.02-0.04), or one drawn from the landmarks when dlib finds none there."""
        eyes = np.mean([points["left_eye"], points["right_eye"]], axis=0)
        found = self.detect(photo, around=eyes)
        return face_box(points) if found is None else found

    def detect(self, photo, around=None):
        """dlib's largest face detection (left, top, right, bottom) in an RGB uint8 photo (the one holding
        the point `around`, if given), or None."""
        found = [(d.left(), d.top(), d.right(), d.bottom())
                 for d in self.detector(np.ascontiguousarray(photo, dtype=np.uint8), 1)]
        if around is not None:
            found = [b for b in found if b[0] <= around[0] <= b[2] and b[1] <= around[1] <= b[3]]
        return max(found, key=lambda b: b[2] - b[0], default=None)

    def embed(self, photo, box):
        photo = np.ascontiguousarray(photo, dtype=np.uint8)
        rectangle = self.dlib.rectangle(*[int(round(v)) for v in box])
        chip = self.dlib.get_face_chip(photo, self.shape(photo, rectangle), size=150, padding=0.25)
        return np.asarray(self.network.compute_face_descriptor(chip))

    def distance(self, before, after, box):
        """The embedding distance between the same face box in two versions of a photo."""
        return float(np.linalg.norm(self.embed(before, box) - self.embed(after, box)))


def face_box(points):
    """A square box around a face's named landmarks (photo pixels), the size dlib's detector gives: from
    the jaw's width, centred between the eyes and the chin."""
    xs = [points[f"jaw_{i}"][0] for i in range(9)]
    width = max(xs) - min(xs)
    cx = (min(xs) + max(xs)) / 2
    cy = (points["left_eye"][1] + points["right_eye"][1] + 2 * points["jaw_4"][1]) / 4
    half = 0.5 * width
    return cx - half, cy - half, cx + half, cy + half


def aligned_embeddings(embedder, faces, boxes=None, fallback=None):
    """(embeddings (N, 128), boxes) of aligned faces (N, H, W, 3 uint8): each face embedded in boxes[i] when
    given, else in dlib's own detection on it, else (dlib found none: a blurred or distorted face) in
    `fallback` or the median of the other faces' boxes, which share the framing. Give a set of faces and
    their versions (reconstructions, edits) the originals' boxes, so that only the faces differ, never the
    boxes."""
    if boxes is None:
        found = [embedder.detect(face) for face in faces]
        if fallback is None:
            if all(box is None for box in found):
                raise FacegenError("dlib found no face in any of the images: not faces in the model's framing?")
            fallback = tuple(np.median([box for box in found if box is not None], axis=0))
        boxes = [fallback if box is None else box for box in found]
    return np.stack([embedder.embed(face, box) for face, box in zip(faces, boxes)]), boxes
