"""Aligning a folder of labelled face photos to the model's canonical framing (`facegen data align`).

Every photo goes through the same steps as a photo given to `facegen edit`: MediaPipe finds the face's
landmarks (landmarks.FaceFinder), a similarity transform from the eyes and mouth corners maps it to the
canonical frame (landmarks.align_face), and the frame is resampled at the model's size. The result is
written in CelebA's layout, so every other command reads it unchanged:

    OUT/img_align_celeba/NAME.png     the aligned faces (lossless)
    OUT/list_attr_celeba.txt          the source's labels, every column carried over
    OUT/list_landmarks.txt            the landmarks in the aligned frame
    OUT/list_eval_partition.txt       the source's partition, or a fixed split by file-name hash
    OUT/not_aligned.txt               every photo left out, and why
    OUT/align.json                    the counts

The face finder enlarges small photos before detection and pads a photo whose face touches its border
(landmarks.FaceFinder). Progress is journalled photo by photo
(OUT/align-journal.jsonl), so an interrupted run resumes where it stopped.
"""

import csv
import json
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .attributes import celeba_column
from .data import IMAGE_SUFFIXES, to_rgb
from .errors import FacegenError
from .files import UNREADABLE_IMAGE_ERRORS, atomic_path, write_json
from .landmarks import CANONICAL_SIZE, FaceFinder, align_face

JOURNAL = "align-journal.jsonl"


# ---------------------------------------------------------------------------------------------
# Labels: a CelebA attribute file or an attributes.csv, kept apart from the images or beside them
# ---------------------------------------------------------------------------------------------

def read_label_file(path):
    """(column names in CelebA's spelling, {file name: [values]}) from a CelebA attribute file or a CSV."""
    path = Path(path)
    if not path.is_file():
        raise FacegenError(f"{path}: no such label file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "filename" not in reader.fieldnames:
                raise FacegenError(f"{path}: needs a 'filename' column")
            names = [n for n in reader.fieldnames if n != "filename"]
            columns = [celeba_column(n)[0] for n in names]
            inverted = [celeba_column(n)[1] for n in names]
            try:
                rows = {row["filename"]: [-int(row[n] or 0) if inv else int(row[n] or 0)
                                          for n, inv in zip(names, inverted)] for row in reader}
            except ValueError:
                raise FacegenError(f"{path}: values must be 1, -1 or 0") from None
        return columns, rows
    lines = path.read_text().splitlines()
    try:
        columns = lines[1].split()
        rows = {}
        for line in lines[2:]:
            fields = line.split()
            if fields:
                rows[fields[0]] = [int(v) for v in fields[1:]]
    except (IndexError, ValueError):
        raise FacegenError(f"{path}: not in CelebA's attribute format (count, header, one row per file)") from None
    if any(len(values) != len(columns) for values in rows.values()):
        raise FacegenError(f"{path}: rows do not match the {len(columns)} columns")
    return columns, rows


def find_label_file(src):
    for name in ("list_attr_celeba.txt", "attributes.csv"):
        if (src / name).is_file():
            return src / name
    raise FacegenError(f"{src}: no list_attr_celeba.txt or attributes.csv; give the labels with --attributes FILE")


def index_images(src):
    """{relative path: path} and {file name: [paths]} of every image below `src`."""
    by_relative, by_name = {}, {}
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith("."):
            by_relative[path.relative_to(src).as_posix()] = path
            by_name.setdefault(path.name, []).append(path)
    return by_relative, by_name


def locate(name, src, by_relative, by_name):
    """The image a label row names: as a path relative to SRC, in img_align_celeba/, or by file name."""
    for candidate in (name, f"img_align_celeba/{name}"):
        if candidate in by_relative:
            return by_relative[candidate]
    found = by_name.get(Path(name).name, [])
    if len(found) > 1:
        raise FacegenError(f"{src}: {len(found)} images are named {Path(name).name}; name them by relative path")
    return found[0] if found else None


def partition_of(name, holdout):
    """0 train, 1 valid, 2 test: a fixed split by a hash of the file name (the same on every machine)."""
    bucket = zlib.crc32(name.encode()) % 10_000 / 10_000
    return 2 if bucket < holdout else 1 if bucket < 2 * holdout else 0


# ---------------------------------------------------------------------------------------------
# One photo
# ---------------------------------------------------------------------------------------------

def find_main_face(finder, image):
    """The landmarks of the largest face in an RGB uint8 image (the photo's subject), or None."""
    faces = finder(image)
    if not faces:
        return None
    return max(faces, key=lambda points: np.hypot(*np.subtract(points["right_eye"], points["left_eye"])))


_finder = None


def _start_worker():
    global _finder
    _finder = FaceFinder(max_faces=4)


def _align_one(job):
    """Worker: align one photo and write it; returns a journal record."""
    name, source, target, size = job
    try:
        with Image.open(source) as image:
            photo = to_rgb(ImageOps.exif_transpose(image))
    except UNREADABLE_IMAGE_ERRORS as e:
        return {"name": name, "error": f"cannot read the image ({e})"}
    points = find_main_face(_finder, np.asarray(photo))
    if points is None:
        return {"name": name, "error": "no face found"}
    crop, _, aligned_points = align_face(photo, points, size)
    with atomic_path(target) as tmp:
        Image.fromarray(crop).save(tmp, format="PNG")
    return {"name": name, "points": {k: [round(x, 2), round(y, 2)] for k, (x, y) in aligned_points.items()}}


# ---------------------------------------------------------------------------------------------
# A folder
# ---------------------------------------------------------------------------------------------

def align_dataset(src, out, attributes=None, size=CANONICAL_SIZE, holdout=0.05, workers=None, progress=None,
                  log=print):
    """Align every labelled photo of SRC into OUT (CelebA layout); returns the counts.

    Resumable: photos already in OUT's journal are not done again. Photos without a face or that cannot
    be read are listed in OUT/not_aligned.txt with the reason and counted, never dropped silently.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FacegenError(f"{src}: no such folder")
    if src.resolve() == out.resolve():
        raise FacegenError("the output folder is the source folder; choose another OUT")
    label_file = Path(attributes) if attributes else find_label_file(src)
    columns, labels = read_label_file(label_file)
    by_relative, by_name = index_images(src)
    partition_file = label_file.parent / "list_eval_partition.txt"
    partition = dict(line.split() for line in partition_file.read_text().splitlines() if line.strip()) \
        if partition_file.is_file() else None

    names, missing, sources, targets = [], [], {}, {}
    for name in labels:
        source = locate(name, src, by_relative, by_name)
        if source is None:
            missing.append(name)
            continue
        target_name = Path(name).with_suffix(".png").name
        if target_name in targets.values():
            raise FacegenError(f"{label_file}: two photos would both be written as {target_name}")
        names.append(name)
        sources[name], targets[name] = source, target_name
    if not names:
        raise FacegenError(f"{src}: none of the {len(labels)} labelled photos were found")

    out.mkdir(parents=True, exist_ok=True)
    journal_path = out / JOURNAL
    done = {}
    if journal_path.is_file():
        for line in journal_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption
                continue
            name = record["name"]
            if name in sources and ("error" in record or (out / "img_align_celeba" / targets[name]).is_file()):
                done[name] = record
        if done:
            log(f"resuming: {len(done)} of {len(names)} photos already done")
    todo = [(n, str(sources[n]), str(out / "img_align_celeba" / targets[n]), size) for n in names if n not in done]
    (out / "img_align_celeba").mkdir(exist_ok=True)
    task = progress.add_task("aligning", total=len(names), completed=len(done)) if progress else None
    workers = workers or os.cpu_count() or 1
    with open(journal_path, "a") as journal, ExitStack() as stack:
        if workers == 1:
            _start_worker()
            records = map(_align_one, todo)
        else:  # spawned, not forked: a fork of a process whose MediaPipe graphs run threads can crash
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=_start_worker))
            records = pool.map(_align_one, todo, chunksize=16)
        for record in records:
            done[record["name"]] = record
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            if progress:
                progress.advance(task)

    aligned = [n for n in names if "points" in done[n]]
    landmark_names = list(done[aligned[0]]["points"]) if aligned else []
    attr_lines = [str(len(aligned)), " ".join(columns)]
    landmark_lines = [str(len(aligned)), " ".join(landmark_names)]
    partition_lines = []
    for name in aligned:
        target = targets[name]
        attr_lines.append(f"{target} " + " ".join(f"{v:2d}" for v in labels[name]))
        points = done[name]["points"]
        landmark_lines.append(f"{target} " + " ".join(f"{points[k][0]:.2f} {points[k][1]:.2f}" for k in landmark_names))
        split = partition.get(Path(name).name) if partition else None
        partition_lines.append(f"{target} {split if split is not None else partition_of(name, holdout)}")
    problems = [f"{n} {done[n]['error']}" for n in names if "error" in done[n]] + \
               [f"{n} not found under {src}" for n in missing]
    for file_name, lines in (("list_attr_celeba.txt", attr_lines), ("list_landmarks.txt", landmark_lines),
                             ("list_eval_partition.txt", partition_lines), ("not_aligned.txt", problems)):
        with atomic_path(out / file_name) as tmp:
            Path(tmp).write_text("\n".join(lines) + ("\n" if lines else ""))
    counts = {"labelled": len(labels), "aligned": len(aligned),
              "no face": sum(done[n].get("error") == "no face found" for n in names),
              "unreadable": sum(done[n].get("error", "").startswith("cannot read") for n in names),
              "not found": len(missing), "size": size,
              "splits": {s: sum(line.endswith(f" {i}") for line in partition_lines)
                         for i, s in enumerate(("train", "valid", "test"))}}
    write_json(out / "align.json", counts)
    return counts
