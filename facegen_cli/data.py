"""Labelled face images: CelebA's layout or any folder with an attributes CSV.

CelebA layout:  ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt (+1/-1 per column),
                optional ROOT/list_eval_partition.txt (0 train, 1 valid, 2 test).
CSV layout:     ROOT/attributes.csv with a `filename` column (relative to ROOT) and one column
                per attribute holding 1, -1 or 0 (0 = unknown, left free in training).
Images are centre-cropped to a square (CelebA's standard 178x178 crop of its 178x218 faces)
and resized to the model's resolution.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import layout
from .attributes import DEFAULT_ATTRIBUTES, celeba_column
from .errors import FacegenError
from .images import UNREADABLE_IMAGE_ERRORS, load_image


@dataclass
class LabelledImages:
    root: Path
    paths: list  # of Path
    labels: torch.Tensor  # (N, A) int8 in {-1, 0, 1}
    attributes: list  # of str


def read_dataset(root, split="all"):
    """The images and labels of a CelebA-layout or CSV-layout folder (layout.py)."""
    root = Path(root)
    if not root.is_dir():
        raise FacegenError(f"{root}: no such data folder")
    if (root / layout.ATTRIBUTE_FILE).is_file():
        data = _read_celeba(root, split)
    elif (root / layout.CSV_FILE).is_file():
        table = layout.read_attribute_file(root / layout.CSV_FILE)
        data = LabelledImages(root, [root / n for n in table.names], torch.from_numpy(table.values), table.columns)
    else:
        raise FacegenError(f"{root}: no {layout.ATTRIBUTE_FILE} (CelebA layout) or {layout.CSV_FILE} found")
    if not data.paths:
        raise FacegenError(f"{root}: the data set lists no images" + (f" in split {split!r}" if split != "all" else ""))
    return data


def _read_celeba(root, split):
    """The default attributes from CelebA's columns (No_Beard read inverted as beard), 0 where a column is
    missing; the split from the partition file when there is one."""
    table = layout.read_attribute_file(root / layout.ATTRIBUTE_FILE)
    labels = np.zeros((len(table.names), len(DEFAULT_ATTRIBUTES)), dtype=np.int8)
    for i, attribute in enumerate(DEFAULT_ATTRIBUTES):
        column, inverted = celeba_column(attribute)
        if column in table.columns:
            values = table.values[:, table.columns.index(column)]
            labels[:, i] = -values if inverted else values
    keep = np.ones(len(table.names), dtype=bool)
    if split != "all":
        if split not in layout.SPLITS:
            raise FacegenError(f"unknown split {split!r}; use all, train, valid or test")
        partition = layout.read_partition(root / layout.PARTITION_FILE)
        if partition is not None:
            keep = np.array([partition.get(n) == layout.SPLITS[split] for n in table.names], dtype=bool)
    paths = [root / layout.IMAGE_DIR / n for n, k in zip(table.names, keep) if k]
    return LabelledImages(root, paths, torch.from_numpy(labels[keep]), list(DEFAULT_ATTRIBUTES))


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
