"""Faces in photos: MediaPipe landmarks, named like the built-in faces', and the alignment to the
model's canonical 128x128 framing (CelebA's aligned crop, which the built-in faces reproduce).

Points are (x, y) in pixels. MediaPipe 0.10.14 ships its face-detection and face-mesh models inside
the wheel, so nothing is downloaded. The full-range detector finds faces of any size; the mesh then
runs on a square crop around each, which is what makes small faces in large photos work.
"""

import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .errors import FacegenError

CANONICAL_SIZE = 128
# The detector works on a downscaled copy of the photo; faces in photos smaller than this are enlarged first.
# A photo smaller than this on a side, or longer than MAX_ASPECT times its width, holds no face to find.
MIN_FACE_SIDE = 16
MAX_ASPECT = 8
MIN_DETECTION_SIDE = 384
# Where the built-in renderer puts the eyes and mouth corners (its geometry's means), in pixels of a
# 128-pixel frame; the similarity transform to these four points defines the framing.
CANONICAL_POINTS = {"left_eye": (49.92, 64.0), "right_eye": (78.08, 64.0),
                    "mouth_left": (54.4, 94.08), "mouth_right": (73.6, 94.08)}

# Face-mesh indices for each named point ("left" = the image's left); several indices are averaged.
MESH_POINTS = {
    "left_eye": (33, 133, 159, 145), "right_eye": (362, 263, 386, 374),
    "left_eye_outer": (33,), "left_eye_inner": (133,), "right_eye_inner": (362,), "right_eye_outer": (263,),
    "left_brow_outer": (70,), "left_brow_inner": (107,), "right_brow_inner": (336,), "right_brow_outer": (300,),
    "nose_tip": (1,), "nose_base": (2,), "mouth_left": (61,), "mouth_right": (291,),
    "upper_lip": (0,), "lower_lip": (17,),
    **{f"jaw_{i}": (index,) for i, index in enumerate((234, 132, 172, 150, 152, 379, 397, 361, 454))},
    "hairline_left": (103,), "hairline_center": (10,), "hairline_right": (332,),
}


class FaceFinder:
    """MediaPipe face detection + face mesh; call it on an RGB uint8 image, get named points per face.

    MediaPipe runs in a child process (`python -m facegen_cli.landmarks`): its OpenCV asserts end a process
    on some images, and its C++ logging writes to file descriptor 2. In the child, an abort costs that one
    image (a FacegenError here; the next call starts a new child) and the logging goes nowhere. The child
    starts at once and loads its models while the caller loads its own."""

    def __init__(self, max_faces=10, min_confidence=0.5):
        self.arguments = [str(max_faces), str(min_confidence)]
        self.child = None
        self._start()

    def _start(self):
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.child = subprocess.Popen([sys.executable, "-m", "facegen_cli.landmarks", *self.arguments],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      env=env)
        self.ready = False

    def _ask(self, method, image):
        if self.child is None:
            self._start()
        try:
            if not self.ready:
                self._receive()  # the child's start: its models loaded, or why not
                self.ready = True
            pickle.dump((method, image), self.child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.child.stdin.flush()
            return self._receive()
        except (EOFError, BrokenPipeError, ConnectionResetError, pickle.UnpicklingError):
            code = self.child.wait()
            self.child = None
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise FacegenError(f"the face finder (MediaPipe) stopped on this image ({how})") from None

    def _receive(self):
        ok, value = pickle.load(self.child.stdout)
        if not ok:
            raise FacegenError(value)
        return value

    def __call__(self, image):
        """A list of {name: (x, y)}, left to right, one per face found (empty when none)."""
        height, width = image.shape[:2]
        if min(height, width) < MIN_FACE_SIDE or max(height, width) > MAX_ASPECT * min(height, width):
            return []  # no face fits, and MediaPipe's OpenCV aborts on some such shapes (3000x2)
        return self._ask("faces", np.ascontiguousarray(image))

    def person(self, image):
        """(H, W) float32 in [0, 1]: where the person (head, hair, hat, shoulders) is in an RGB uint8 image;
        0 is the background (MediaPipe's selfie segmentation)."""
        return self._ask("person", np.ascontiguousarray(image))

    def close(self):
        if self.child is not None:
            self.child.stdin.close()
            self.child.wait()
            self.child = None


class MediaPipeFaces:
    """What runs in FaceFinder's child: the detector and the mesh, and the segmenter from its first use."""

    def __init__(self, max_faces, min_confidence):
        from mediapipe.python.solutions import face_detection, face_mesh

        # protobuf's deprecation warning, raised inside MediaPipe when it reads its first result
        warnings.filterwarnings("ignore", message=r"SymbolDatabase\.GetPrototype\(\) is deprecated")
        self.detector = face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)
        self.mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                       min_detection_confidence=min_confidence)
        self.max_faces = max_faces
        self.segmenter = None

    def faces(self, image):
        """Small images are enlarged first (the detector misses small faces), and when nothing is found the
        image is padded by its border and tried again (a face that fills the photo, chin or hair cut by its
        edges, is easier to find with room around it)."""
        height, width = image.shape[:2]
        scale = max(1.0, MIN_DETECTION_SIDE / min(height, width))
        if scale > 1:
            image = np.asarray(Image.fromarray(image).resize((round(width * scale), round(height * scale)),
                                                             Image.Resampling.BICUBIC))
        pad = 0
        faces = self._find(image)
        if not faces:
            pad = min(image.shape[:2]) // 3
            faces = self._find(np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        return [{name: ((x - pad) / scale, (y - pad) / scale) for name, (x, y) in face.items()} for face in faces]

    def _find(self, image):
        height, width = image.shape[:2]
        detections = self.detector.process(np.ascontiguousarray(image)).detections or []
        faces = []
        for detection in detections[:self.max_faces]:
            box = detection.location_data.relative_bounding_box
            cx, cy = (box.xmin + box.width / 2) * width, (box.ymin + box.height / 2) * height
            side = 2.0 * max(box.width * width, box.height * height)  # the mesh wants the whole head
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            crop = np.asarray(Image.fromarray(image).crop((x0, y0, x0 + int(side), y0 + int(side))))
            result = self.mesh.process(np.ascontiguousarray(crop)).multi_face_landmarks
            if not result:
                continue
            mesh = np.array([(p.x * crop.shape[1] + x0, p.y * crop.shape[0] + y0) for p in result[0].landmark])
            faces.append({name: tuple(float(v) for v in mesh[list(indices)].mean(0))
                          for name, indices in MESH_POINTS.items()})
        return sorted(faces, key=lambda f: f["nose_tip"][0])

    def person(self, image):
        if self.segmenter is None:
            from mediapipe.python.solutions import selfie_segmentation

            self.segmenter = selfie_segmentation.SelfieSegmentation(model_selection=0)
        return self.segmenter.process(np.ascontiguousarray(image)).segmentation_mask


def serve(max_faces, min_confidence):
    """FaceFinder's child: (method, image) pickles in on stdin, (ok, result or message) pickles out. Only
    the protocol uses stdout; MediaPipe's own output on descriptors 1 and 2 goes to /dev/null."""
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    requests = sys.stdin.buffer

    def reply(ok, value):
        pickle.dump((ok, value), replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()

    try:
        faces = MediaPipeFaces(max_faces, min_confidence)
    except Exception as e:  # mediapipe missing or broken: said once, on the first call
        reply(False, f"MediaPipe did not start: {e}")
        return
    reply(True, None)
    while True:
        try:
            method, image = pickle.load(requests)
        except EOFError:  # the parent closed the pipe: done
            return
        try:
            reply(True, getattr(faces, method)(image))
        except Exception as e:
            reply(False, f"MediaPipe failed on this image: {e}")


def similarity_transform(source, target):
    """Least-squares rotation + uniform scale + shift taking points `source` to `target` (both (N, 2)):
    the 2x3 matrix M with target ~ M @ [x, y, 1]."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    # Unknowns (a, b, tx, ty): x' = a x - b y + tx, y' = b x + a y + ty.
    rows_x = np.column_stack([source[:, 0], -source[:, 1], np.ones(len(source)), np.zeros(len(source))])
    rows_y = np.column_stack([source[:, 1], source[:, 0], np.zeros(len(source)), np.ones(len(source))])
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.vstack([rows_x, rows_y]), np.concatenate([target[:, 0], target[:, 1]]),
                                         rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def invert(matrix):
    linear_inverse = np.linalg.inv(matrix[:, :2])
    return np.column_stack([linear_inverse, -linear_inverse @ matrix[:, 2]])


def transform_points(points, matrix):
    """Apply a 2x3 matrix to a {name: (x, y)} dict."""
    return {name: tuple(matrix @ np.array([x, y, 1.0])) for name, (x, y) in points.items()}


def alignment(points, size=CANONICAL_SIZE):
    """The 2x3 matrix from photo pixels to the canonical size x size frame, from a face's named points."""
    names = list(CANONICAL_POINTS)
    target = np.array([CANONICAL_POINTS[n] for n in names]) * size / CANONICAL_SIZE
    return similarity_transform([points[n] for n in names], target)


def face_scale(matrix):
    """Photo pixels per crop pixel of an alignment matrix (photo -> crop)."""
    return float(1 / np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def warp(image, matrix, size, resample=Image.Resampling.BICUBIC):
    """Warp a PIL image (any mode) by a 2x3 matrix into an output of `size` (w, h); outside is 0."""
    inverse = invert(matrix)  # PIL asks, for each output pixel, where to read in the input
    # PIL samples pixel centres at +0.5; the matrices work on the same pixel-centre coordinates.
    return image.transform(size, Image.Transform.AFFINE, tuple(inverse.ravel()), resample=resample, fillcolor=0)


def extend_past_edges(region, pads, side):
    """Pad an RGB uint8 array by `pads` ((top, bottom), (left, right)) as FFHQ's alignment does: mirror the
    picture, then blur it and fade it towards the picture's median colour with the distance from the edge,
    so that no hard black border or sharp mirrored face appears. `side`: the frame's side in pixels."""
    padded = np.pad(region, (*pads, (0, 0)), mode="symmetric").astype(np.float32)
    (top, bottom), (left, right) = pads
    rows, columns = np.arange(padded.shape[0]), np.arange(padded.shape[1])
    dy = np.maximum(top - rows, rows - (padded.shape[0] - bottom - 1)).clip(min=0)
    dx = np.maximum(left - columns, columns - (padded.shape[1] - right - 1)).clip(min=0)
    distance = np.maximum(dy[:, None], dx[None, :])[..., None].astype(np.float32)
    blurred = np.asarray(Image.fromarray(padded.astype(np.uint8)).filter(ImageFilter.GaussianBlur(side * 0.02)),
                         dtype=np.float32)
    padded += (blurred - padded) * np.clip(distance / (side * 0.05), 0, 1)
    padded += (np.median(region, axis=(0, 1)) - padded) * np.clip(distance / (side * 0.3), 0, 0.7)
    return np.rint(padded).astype(np.uint8)


def frame(photo, matrix, size=CANONICAL_SIZE):
    """The size x size crop that a 2x3 matrix (photo -> frame) cuts out of a PIL RGB photo, uint8.

    Only the part of the photo under the frame is resampled; where the frame reaches past the photo's
    edges, the photo is extended (extend_past_edges) instead of filled with black, which no face shows.
    """
    corners = invert(matrix) @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], dtype=np.float64)
    x0, y0 = (np.floor(corners.min(1)).astype(int) - 2).tolist()
    x1, y1 = (np.ceil(corners.max(1)).astype(int) + 2).tolist()
    image = np.asarray(photo)
    height, width = image.shape[:2]
    region = image[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)]
    pads = ((max(0, -y0), max(0, y1 - height)), (max(0, -x0), max(0, x1 - width)))
    if any(p for pair in pads for p in pair):
        region = extend_past_edges(region, pads, side=max(x1 - x0, y1 - y0))
    # Region pixel (0, 0) is photo pixel (x0, y0).
    shifted = np.column_stack([matrix[:, :2], matrix[:, 2] + matrix[:, :2] @ [x0, y0]])
    return np.asarray(warp(Image.fromarray(region), shifted, (size, size)))


def align_face(photo, points, size=CANONICAL_SIZE):
    """(aligned uint8 crop, 2x3 matrix photo -> crop, the points in the crop's frame) of a PIL RGB photo."""
    matrix = alignment(points, size)
    return frame(photo, matrix, size), matrix, transform_points(points, matrix)


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]))
