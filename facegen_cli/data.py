"""Labelled face images: CelebA's layout or any folder with an attributes CSV.

CelebA layout:  ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt (+1/-1 per column),
                optional ROOT/list_eval_partition.txt (0 train, 1 valid, 2 test).
CSV layout:     ROOT/attributes.csv with a `filename` column (relative to ROOT) and one column
                per attribute holding 1, -1 or 0 (0 = unknown, left free in training).
Images are centre-cropped to a square (CelebA's standard 178x178 crop of its 178x218 faces)
and resized to the model's resolution.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .attributes import DEFAULT_ATTRIBUTES, celeba_column
from .errors import FacegenError
from .files import UNREADABLE_IMAGE_ERRORS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
SPLITS = {"train": "0", "valid": "1", "test": "2"}


@dataclass
class LabelledImages:
    root: Path
    paths: list  # of Path
    labels: torch.Tensor  # (N, A) int8 in {-1, 0, 1}
    attributes: list  # of str


def read_dataset(root, split="all"):
    """The images and labels of a CelebA-layout or CSV-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise FacegenError(f"{root}: no such data folder")
    if (root / "list_attr_celeba.txt").is_file():
        data = _read_celeba(root, split)
    elif (root / "attributes.csv").is_file():
        data = _read_csv(root)
    else:
        raise FacegenError(f"{root}: no list_attr_celeba.txt (CelebA layout) or attributes.csv found")
    if not data.paths:
        raise FacegenError(f"{root}: the data set lists no images" + (f" in split {split!r}" if split != "all" else ""))
    return data


def _read_celeba(root, split):
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    try:
        columns = lines[1].split()
        rows = [line.split() for line in lines[2:] if line.strip()]
        values = np.array([[int(v) for v in row[1:]] for row in rows], dtype=np.int8)
    except (IndexError, ValueError):
        raise FacegenError(f"{root / 'list_attr_celeba.txt'}: not in CelebA's attribute format") from None
    if values.ndim != 2 or values.shape[1] != len(columns):
        raise FacegenError(f"{root / 'list_attr_celeba.txt'}: rows do not match the {len(columns)} columns")
    names = [row[0] for row in rows]
    labels = np.zeros((len(rows), len(DEFAULT_ATTRIBUTES)), dtype=np.int8)
    for i, attribute in enumerate(DEFAULT_ATTRIBUTES):
        column, inverted = celeba_column(attribute)
        if column in columns:
            labels[:, i] = -values[:, columns.index(column)] if inverted else values[:, columns.index(column)]
    keep = np.ones(len(names), dtype=bool)
    if split != "all":
        if split not in SPLITS:
            raise FacegenError(f"unknown split {split!r}; use all, train, valid or test")
        partition_file = root / "list_eval_partition.txt"
        if partition_file.is_file():
            partition = dict(line.split() for line in partition_file.read_text().splitlines() if line.strip())
            keep = np.array([partition.get(n) == SPLITS[split] for n in names])
    paths = [root / "img_align_celeba" / n for n, k in zip(names, keep) if k]
    return LabelledImages(root, paths, torch.from_numpy(labels[keep]), list(DEFAULT_ATTRIBUTES))


def _read_csv(root):
    with open(root / "attributes.csv", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise FacegenError(f"{root / 'attributes.csv'}: needs a 'filename' column")
        attributes = [name for name in reader.fieldnames if name != "filename"]
        paths, labels = [], []
        for line, row in enumerate(reader, start=2):
            try:
                labels.append([int(row[a] or 0) for a in attributes])
            except ValueError:
                raise FacegenError(f"{root / 'attributes.csv'} line {line}: values must be 1, -1 or 0") from None
            paths.append(root / row["filename"])
    labels = torch.tensor(labels, dtype=torch.int8).reshape(-1, len(attributes))
    if labels.numel() and not torch.isin(labels, torch.tensor([-1, 0, 1], dtype=torch.int8)).all():
        raise FacegenError(f"{root / 'attributes.csv'}: values must be 1, -1 or 0")
    return LabelledImages(root, paths, labels, attributes)


def deep_grey_scale(image):
    """How many of a 16- or 32-bit grey image's levels make one 8-bit level: 257 for 16-bit data, 1 for an
    "I" image that holds only 8-bit values."""
    return 257 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB. 16- and 32-bit grey ("I;16", "I") are scaled to 8 bits first:
    PIL's own convert clips them, which turns a 16-bit photo white."""
    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64) / deep_grey_scale(image)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_image(path, size):
    """An RGB image, EXIF orientation applied, centre-cropped square and resized: uint8 (size, size, 3)."""
    with Image.open(path) as image:
        image = to_rgb(ImageOps.exif_transpose(image))
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def to_tensor(images):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images):
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images, columns, padding=2):
    """uint8 images (N, H, W, C) -> one uint8 image (H', W', C), `columns` to a row, each framed by
    `padding` black pixels (torchvision's make_grid layout)."""
    count, height, width, channels = images.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                    dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + padding) + padding, (i % columns) * (width + padding) + padding
        grid[top:top + height, left:left + width] = image
    return grid


class ImageDataset(torch.utils.data.Dataset):
    """Items are (index, uint8 image) or (index, None) for a file that cannot be read."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(self.paths[i], self.size)
        except UNREADABLE_IMAGE_ERRORS:
            return i, None


def collate_readable(items):
    """Batch the readable images; return (indices, images, unreadable indices)."""
    good = [(i, image) for i, image in items if image is not None]
    bad = [i for i, image in items if image is None]
    images = np.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, bad


def load_images_and_labels(data_dir, split, size, workers=2):
    """Every readable image of a split in memory: (uint8 (N, size, size, 3), labels (N, A), attributes)."""
    data = read_dataset(data_dir, split)
    loader = torch.utils.data.DataLoader(ImageDataset(data.paths, size), batch_size=256, num_workers=workers,
                                         collate_fn=collate_readable)
    images, index = [], []
    for indices, batch, _ in loader:
        if batch is not None:
            images.append(batch)
            index += indices
    if not images:
        raise FacegenError(f"{data_dir}: no readable images in split {split!r}")
    return np.concatenate(images), data.labels[index], data.attributes


def read_landmarks(root):
    """{file name: {landmark: (x, y)}} from ROOT/list_landmarks.txt (the built-in faces write it), or {}."""
    path = Path(root) / "list_landmarks.txt"
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
