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

import json
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import framing, layout
from .attributes import celeba_column
from .errors import FacegenError
from .files import atomic_path, write_json
from .images import IMAGE_SUFFIXES, UNREADABLE_IMAGE_ERRORS, to_rgb
from .landmarks import CANONICAL_SIZE, FaceFinder, alignment, face_scale, frame, transform_points

log = logging.getLogger(__name__)
JOURNAL = "align-journal.jsonl"


# ---------------------------------------------------------------------------------------------
# Labels: a CelebA attribute file or an attributes.csv, kept apart from the images or beside them
# ---------------------------------------------------------------------------------------------

def read_labels(path):
    """(column names in CelebA's spelling, {file name: [values]}) from a label file (layout.py); a CSV's
    attribute names become CelebA's columns (beard -> No_Beard, its values inverted)."""
    table = layout.read_attribute_file(path)
    if Path(path).suffix.lower() != ".csv":
        return table.columns, {name: row.tolist() for name, row in zip(table.names, table.values)}
    columns = [celeba_column(c) for c in table.columns]
    signs = np.array([-1 if inverted else 1 for _, inverted in columns], dtype=np.int8)
    return [c for c, _ in columns], {name: (row * signs).tolist() for name, row in zip(table.names, table.values)}


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
    """Worker: align one photo and write it; returns a journal record. zoomed: the photo's view is drawn
    (framing.drawn) and its framing recorded with it."""
    name, source, target, size, zoomed = job
    try:
        with Image.open(source) as image:
            photo = to_rgb(ImageOps.exif_transpose(image))
    except UNREADABLE_IMAGE_ERRORS as e:
        return {"name": name, "error": f"cannot read the image ({e})"}
    try:
        points = find_main_face(_finder, np.asarray(photo))
    except FacegenError as e:  # MediaPipe stopped on it (its own process, restarted for the next photo)
        return {"name": name, "error": str(e)}
    if points is None:
        return {"name": name, "error": "no face found"}
    matrix = alignment(points, size)
    view = framing.drawn(name, face_scale(matrix), size) if zoomed else framing.Framing.whole(size)
    matrix = view.of(matrix, size)
    with atomic_path(target) as tmp:
        Image.fromarray(frame(photo, matrix, size)).save(tmp, format="PNG")
    record = {"name": name, "points": {k: [round(x, 2), round(y, 2)]
                                       for k, (x, y) in transform_points(points, matrix).items()}}
    return {**record, "framing": [round(v, 4) for v in astuple(view)]} if zoomed else record


# ---------------------------------------------------------------------------------------------
# A folder
# ---------------------------------------------------------------------------------------------

@dataclass
class AlignCounts:
    """What `data align` did (OUT/align.json): photos labelled, aligned, and each reason one was not."""
    labelled: int
    aligned: int
    no_face: int
    unreadable: int
    not_found: int
    failed: int  # MediaPipe stopped on it (an abort inside the library; the photo is skipped)
    size: int
    splits: dict = field(default_factory=dict)  # train, valid, test: how many aligned photos each


def locate_photos(src, label_file, names):
    """({label name: source path}, {label name: output file name}, [names with no photo below SRC])."""
    by_relative, by_name = index_images(src)
    sources, targets, missing = {}, {}, []
    for name in names:
        source = locate(name, src, by_relative, by_name)
        if source is None:
            missing.append(name)
            continue
        target_name = Path(name).with_suffix(".png").name
        if target_name in targets.values():
            raise FacegenError(f"{label_file}: two photos would both be written as {target_name}")
        sources[name], targets[name] = source, target_name
    if not sources:
        raise FacegenError(f"{src}: none of the {len(names)} labelled photos were found")
    return sources, targets, missing


def read_journal(out, sources, targets):
    """The journal's records of photos already done, whose aligned image (if any) is still there."""
    done = {}
    journal_path = Path(out) / JOURNAL
    if journal_path.is_file():
        for line in journal_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption
                continue
            name = record["name"]
            if name in sources and ("error" in record or (Path(out) / layout.IMAGE_DIR / targets[name]).is_file()):
                done[name] = record
    return done


def align_photos(todo, done, journal_path, workers, progress, task):
    """Align each job of `todo` (in worker processes when workers > 1), journalling each record as it
    comes; records go into `done`."""
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


def align_dataset(src, out, *, attributes=None, size=CANONICAL_SIZE, holdout=0.05, zoomed=False, workers=None,
                  progress=None):
    """Align every labelled photo of SRC into OUT (CelebA layout); returns the AlignCounts.
    zoomed: each photo as a view of its canonical crop (framing.drawn: zoomed as far as the photo holds, for
    most), listed in OUT/list_framing.txt: the data of a framed model.

    Resumable: photos already in OUT's journal are not done again. Photos without a face or that cannot
    be read are listed in OUT/not_aligned.txt with the reason and counted, never dropped silently.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FacegenError(f"{src}: no such folder")
    if src.resolve() == out.resolve():
        raise FacegenError("the output folder is the source folder; choose another OUT")
    label_file = Path(attributes) if attributes else layout.find_label_file(src)
    columns, labels = read_labels(label_file)
    partition = layout.read_partition(label_file.parent / layout.PARTITION_FILE)
    sources, targets, missing = locate_photos(src, label_file, list(labels))
    names = list(sources)

    out.mkdir(parents=True, exist_ok=True)
    done = read_journal(out, sources, targets)
    if any(("framing" in r) != zoomed for r in done.values() if "points" in r):
        raise FacegenError(f"{out} was begun {'without' if zoomed else 'with'} --zoomed; align into another folder")
    if done:
        log.info(f"resuming: {len(done)} of {len(names)} photos already done")
    todo = [(n, str(sources[n]), str(out / layout.IMAGE_DIR / targets[n]), size, zoomed)
            for n in names if n not in done]
    (out / layout.IMAGE_DIR).mkdir(exist_ok=True)
    task = progress.add_task("aligning", total=len(names), completed=len(done)) if progress else None
    align_photos(todo, done, out / JOURNAL, workers or os.cpu_count() or 1, progress, task)

    aligned = [n for n in names if "points" in done[n]]
    rows = [(targets[n], labels[n], (partition or {}).get(Path(n).name, partition_of(n, holdout)), done[n]["points"])
            for n in aligned]
    layout.write_layout(out, columns, rows, landmark_names=list(done[aligned[0]]["points"]) if aligned else [],
                        framings={targets[n]: done[n]["framing"] for n in aligned} if zoomed else None)
    problems = [f"{n} {done[n]['error']}" for n in names if "error" in done[n]] + \
               [f"{n} not found under {src}" for n in missing]
    with atomic_path(out / "not_aligned.txt") as tmp:
        Path(tmp).write_text("\n".join(problems) + ("\n" if problems else ""))
    counts = AlignCounts(labelled=len(labels), aligned=len(aligned),
                         no_face=sum(done[n].get("error") == "no face found" for n in names),
                         unreadable=sum(done[n].get("error", "").startswith("cannot read") for n in names),
                         not_found=len(missing),
                         failed=sum(done[n].get("error", "").startswith("the face finder") for n in names), size=size,
                         splits={s: sum(str(row[2]) == str(i) for row in rows)
                                 for i, s in enumerate(("train", "valid", "test"))})
    write_json(out / "align.json", asdict(counts))
    return counts
