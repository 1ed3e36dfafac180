"""CelebA's folder layout, the one on-disk format of labelled faces that every command reads and that
`data synth` and `data align` write:

    ROOT/img_align_celeba/NAME        the images
    ROOT/list_attr_celeba.txt         a count line, a header of column names, then NAME v1 v2 ... (+1/-1)
    ROOT/list_eval_partition.txt      NAME 0|1|2 (train, valid, test); optional
    ROOT/list_landmarks.txt           a count line, a header of point names, then NAME x1 y1 x2 y2 ...
    ROOT/list_framing.txt             NAME zoom cx cy: the view of the canonical crop each image is
                                      (framing.py); optional, absent for whole faces

An `attributes.csv` (a `filename` column and one column per attribute, 1/-1/0) may stand in for
list_attr_celeba.txt. The landmark names are facegen's own (LANDMARK_NAMES), the same for MediaPipe's
points (landmarks.py) and the built-in faces' (synthfaces.py).
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FacegenError
from .files import atomic_path

IMAGE_DIR = "img_align_celeba"
ATTRIBUTE_FILE = "list_attr_celeba.txt"
CSV_FILE = "attributes.csv"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_FILE = "list_landmarks.txt"
FRAMING_FILE = "list_framing.txt"
SPLITS = {"train": "0", "valid": "1", "test": "2"}

# Named face points ("left" = the image's left), in the order list_landmarks.txt lists them.
LANDMARK_NAMES = [
    "left_eye", "right_eye", "left_eye_outer", "left_eye_inner", "right_eye_inner", "right_eye_outer",
    "left_brow_outer", "left_brow_inner", "right_brow_inner", "right_brow_outer",
    "nose_tip", "nose_base", "mouth_left", "mouth_right", "upper_lip", "lower_lip",
    *[f"jaw_{i}" for i in range(9)],
    "hairline_left", "hairline_center", "hairline_right",
]


@dataclass
class AttributeTable:
    """A label file's contents: one row of values per file name, one column per attribute."""
    columns: list  # as the file spells them (CelebA: "Wearing_Hat", "No_Beard")
    names: list  # file names, as listed
    values: np.ndarray  # int8 (N, len(columns)) in {-1, 0, 1}


def read_attribute_file(path):
    """An AttributeTable from CelebA's list_attr_celeba.txt format or a CSV with a `filename` column."""
    path = Path(path)
    if not path.is_file():
        raise FacegenError(f"{path}: no such label file")
    table = _read_csv(path) if path.suffix.lower() == ".csv" else _read_celeba(path)
    if table.values.size and not np.isin(table.values, (-1, 0, 1)).all():
        raise FacegenError(f"{path}: values must be 1, -1 or 0")
    return table


def _read_celeba(path):
    lines = path.read_text().splitlines()
    try:
        columns = lines[1].split()
        rows = [line.split() for line in lines[2:] if line.strip()]
        values = [[int(v) for v in row[1:]] for row in rows]
    except (IndexError, ValueError):
        raise FacegenError(f"{path}: not in CelebA's attribute format (count, header, one row per file)") from None
    if any(len(row) != len(columns) for row in values):
        raise FacegenError(f"{path}: rows do not match the {len(columns)} columns")
    return AttributeTable(columns, [row[0] for row in rows],
                          np.array(values, dtype=np.int8).reshape(len(rows), len(columns)))


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise FacegenError(f"{path}: needs a 'filename' column")
        columns = [name for name in reader.fieldnames if name != "filename"]
        names, values = [], []
        for line, row in enumerate(reader, start=2):
            try:
                values.append([int(row[c] or 0) for c in columns])
            except ValueError:
                raise FacegenError(f"{path} line {line}: values must be 1, -1 or 0") from None
            names.append(row["filename"])
    return AttributeTable(columns, names, np.array(values, dtype=np.int8).reshape(len(names), len(columns)))


def find_label_file(root):
    """ROOT's list_attr_celeba.txt or attributes.csv."""
    for name in (ATTRIBUTE_FILE, CSV_FILE):
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise FacegenError(f"{root}: no {ATTRIBUTE_FILE} or {CSV_FILE}; give the labels with --attributes FILE")


def read_partition(path):
    """{file name: "0" | "1" | "2"} from a list_eval_partition.txt, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return dict(line.split() for line in path.read_text().splitlines() if line.strip())


def read_landmarks(root):
    """{file name: {landmark: (x, y)}} from ROOT/list_landmarks.txt, or {} when there is none."""
    path = Path(root) / LANDMARK_FILE
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    names = lines[1].split()
    points = {}
    for line in lines[2:]:
        fields = line.split()
        if fields:
            values = [float(v) for v in fields[1:]]
            points[fields[0]] = {n: (values[2 * i], values[2 * i + 1]) for i, n in enumerate(names)}
    return points


def read_framings(root):
    """{file name: (zoom, cx, cy)} from ROOT/list_framing.txt, or {} when there is none (whole faces)."""
    path = Path(root) / FRAMING_FILE
    if not path.is_file():
        return {}
    rows = (line.split() for line in path.read_text().splitlines())
    return {fields[0]: tuple(float(v) for v in fields[1:4]) for fields in rows if fields}


def write_layout(root, columns, rows, landmark_names=None, framings=None):
    """Write ROOT's label files for `rows` of (file name, attribute values, split 0|1|2, {landmark: (x, y)}
    or None): list_attr_celeba.txt, list_eval_partition.txt and, with `landmark_names`,
    list_landmarks.txt, and with `framings` ({file name: (zoom, cx, cy)}) list_framing.txt, each atomically."""
    files = {ATTRIBUTE_FILE: [str(len(rows)), " ".join(columns)] + [
                 f"{name} " + " ".join(f"{v:2d}" for v in values) for name, values, _, _ in rows],
             PARTITION_FILE: [f"{name} {split}" for name, _, split, _ in rows]}
    if landmark_names is not None:
        files[LANDMARK_FILE] = [str(len(rows)), " ".join(landmark_names)] + [
            f"{name} " + " ".join(f"{points[k][0]:.2f} {points[k][1]:.2f}" for k in landmark_names)
            for name, _, _, points in rows]
    if framings is not None:
        files[FRAMING_FILE] = [f"{name} " + " ".join(f"{v:.4f}" for v in framings[name]) for name, *_ in rows]
    for file_name, lines in files.items():
        with atomic_path(Path(root) / file_name) as tmp:
            Path(tmp).write_text("\n".join(lines) + ("\n" if lines else ""))
