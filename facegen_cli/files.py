"""Writing results safely: every output goes to a temporary name first and is renamed into place,
so that an interrupted run never leaves a half-written image, checkpoint or cache shard."""

import copy
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .errors import FacegenError
from .images import UNREADABLE_IMAGE_ERRORS


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What open() and mkdir() give a new file and folder (mkstemp's and mkdtemp's are 0600 and 0700).
_UMASK = _umask()
NEW_FILE_MODE, NEW_DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextmanager
def atomic_path(path, exclusive=False):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, else removed. With
    `exclusive` the name is claimed in the same step (a hard link, which fails where a file of that name
    appeared meanwhile: another run's): OutputExists, and that file is kept. The file has the permissions
    a newly created one would (0666 less the umask; mkstemp's own are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, NEW_FILE_MODE)
    os.close(fd)
    try:
        yield tmp
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExists(path) from None
            except OSError:  # no hard links on this file system (FAT, some shares): claim the name, then fill it
                try:
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, NEW_FILE_MODE))
                except FileExistsError:
                    raise OutputExists(path) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path):
    """Like atomic_path for a folder: fill the yielded folder; it replaces `path` on success (with a new
    folder's permissions, 0777 less the umask; mkdtemp's own are 0700)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(NEW_DIR_MODE)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class Outcome(StrEnum):
    """What became of one input file of a folder command."""
    DONE = "done"
    SKIPPED = "skipped"  # its output exists (not a failure)
    NO_FACE = "no face"
    UNREADABLE = "unreadable"
    FAILED = "failed"


class OutputExists(FacegenError):
    kind = Outcome.SKIPPED  # what FileResult calls it

    def __init__(self, path):
        super().__init__(f"{path} exists; skipped (--overwrite replaces it)")


@dataclass
class FileResult:
    """What became of one input file of a folder command: its output, or the kind of problem and why."""
    path: Path
    output: Optional[Path] = None
    kind: Outcome = Outcome.DONE
    reason: str = ""


def attempt(path, action):
    """(action(), None), or (None, a FileResult saying why) when it fails the way one bad input can: a
    FacegenError (its `kind` attribute, else failed) or an image that cannot be read."""
    try:
        return action(), None
    except FacegenError as e:
        return None, FileResult(Path(path), kind=getattr(e, "kind", Outcome.FAILED), reason=str(e))
    except UNREADABLE_IMAGE_ERRORS as e:
        return None, FileResult(Path(path), kind=Outcome.UNREADABLE, reason=f"cannot read the image ({e})")


def output_path(path, relative, out, overwrite=False):
    """Where the result for input `path` goes: OUT/relative, or the input itself when `out` is None (in
    place). Raises when that would overwrite the input by accident, or skip (OutputExists) an output
    that exists unless `overwrite`."""
    if out is None:
        return Path(path)
    target = Path(out) / relative
    if target.resolve() == Path(path).resolve():
        raise FacegenError("the output would overwrite the input; choose another --out")
    if target.exists() and not overwrite:
        raise OutputExists(target)
    return target


def check_replaceable_folder(out, marker, kind, overwrite):
    """Refuse an OUT that a command writing a whole folder of `kind` (a model, a data set) would destroy: a
    file, a folder holding anything but one of its own kind (one with `marker` in it), or one of its own
    kind without `overwrite`. A new or empty folder passes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FacegenError(f"{out}: is a file, not a folder; --out must name a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise FacegenError(f"{out} holds files that are not {kind}; write into a new or empty folder")
        if not overwrite:
            raise FacegenError(f"{out} holds {kind}; --overwrite replaces it")


def check_output_folder(folder):
    """Fail now, with one line, when `folder` cannot be made a folder (it or a parent is a file)."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            if not path.is_dir():
                raise FacegenError(f"{path}: is a file, not a folder; --out must name a folder")
            return


def save_pretrained(module, folder, dtype=None):
    """module.save_pretrained(folder) (a diffusers model: config.json + safetensors weights), less the
    `_name_or_path` diffusers records in config.json: the folder it was loaded from, a machine's path.
    dtype: save a copy cast to it (torch.float16 halves the files)."""
    if dtype is not None:
        # nn.Module's own cast: diffusers 0.42's ModelMixin.to warns on every dtype cast of a model whose
        # _keep_in_fp32_modules is an empty list, i.e. none to keep (a false alarm on each export)
        module = torch.nn.Module.to(copy.deepcopy(module), dtype)
    module.save_pretrained(folder)
    config = Path(folder) / "config.json"
    data = json.loads(config.read_text())
    data.pop("_name_or_path", None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for written in Path(folder).glob("*.safetensors"):  # as save_tensors
        written.chmod(NEW_FILE_MODE)


def save_tensors(tensors, path):
    """safetensors' save_file, with a new file's permissions: safetensors makes its files 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    os.chmod(path, NEW_FILE_MODE)


def write_json(path, data):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


# Writer options only some formats take (a PNG's XMP travels in its text chunks).
ANIMATED = ("GIF", "PNG", "WEBP")
FORMAT_OPTIONS = {"qtables": ("JPEG",), "subsampling": ("JPEG",), "xmp": ("JPEG", "WEBP", "TIFF"),
                  "exif": ("JPEG", "PNG", "WEBP", "TIFF", "MPO"), "lossless": ("WEBP",), "exact": ("WEBP",),
                  "append_images": ANIMATED, "duration": ANIMATED, "loop": ANIMATED}


def save_image(image, path, metadata=None, save_options=None, mode_from=None, exclusive=False):
    """Save a PIL image atomically, in the format its suffix names; PNGs carry `metadata` as text.
    exclusive: never replace a file of that name, even one another run made meanwhile (atomic_path).

    save_options: extra keywords for PIL's writer (EXIF, ICC profile, XMP, JPEG tables, an animation's
    append_images, duration and loop), those the format does not take left out; "text": a PNG's own text
    chunks, written beside `metadata`. mode_from: a file whose permissions the output takes (otherwise a new file's,
    atomic_path).
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    kwargs = dict(save_options or {})
    text = {**(kwargs.pop("text", None) or {}), **(metadata or {})}
    kwargs = {k: v for k, v in kwargs.items() if fmt in FORMAT_OPTIONS.get(k, (fmt,))}
    if fmt == "TIFF" and "xmp" in kwargs:  # Pillow's TIFF writer takes XMP as its tag 700
        kwargs["tiffinfo"] = {700: kwargs.pop("xmp")}
    if kwargs.get("append_images"):
        kwargs["save_all"] = True
    if fmt == "JPEG" and "qtables" not in kwargs:
        kwargs["quality"] = 95
    if text and fmt == "PNG":  # a PNG's own text chunks (its XMP among them) and ours
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        kwargs["pnginfo"] = info
    try:
        with atomic_path(path, exclusive) as tmp:
            with open(tmp, "wb") as f:  # our own file: a full disk fails its writes, flush or fsync, not silently
                image.save(f, format=fmt, **kwargs)
                f.flush()
                os.fsync(f.fileno())
            verify_image(tmp, path)
            if mode_from is not None:
                shutil.copymode(mode_from, tmp)
    except OSError as e:  # a full disk or a read-only folder fails this output, not the program
        raise FacegenError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def save_deep_rgb(deep, path, text=None, mode_from=None, exclusive=False):
    """save_image for a 16-bit RGB(A) array (images.read_deep_rgb), as a PNG: atomically, checked back;
    `text` ({key: str}) as its text chunks."""
    from .images import read_deep_rgb, write_deep_rgb

    try:
        with atomic_path(path, exclusive) as tmp:
            png = f"{tmp}.png"  # OpenCV picks the format by the name
            try:
                write_deep_rgb(png, deep, text)
                written = read_deep_rgb(png)
                if written is None or not np.array_equal(written, deep):
                    raise FacegenError(f"cannot write {path}: the file written does not read back whole")
                os.replace(png, tmp)
            finally:
                if os.path.exists(png):
                    os.remove(png)
            if mode_from is not None:
                shutil.copymode(mode_from, tmp)
    except OSError as e:
        raise FacegenError(f"cannot write {path}: {e.strerror or e}") from None
    return Path(path)


def verify_image(written, path):
    """Decode the file just `written` in full before it takes `path`'s name: an encoder that stopped short
    (a full disk under a format that does not say so) fails the output, and the old file stays."""
    try:
        with Image.open(written) as check:
            check.load()
    except UNREADABLE_IMAGE_ERRORS as e:
        raise FacegenError(f"cannot write {path}: the file written does not read back whole ({e})") from None


def save_figure(figure, path):
    """Write a matplotlib figure as a PNG atomically, and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return Path(path)


def collect_inputs(inputs, recursive=False, stdin=None):
    """Expand command-line inputs into (files, problems).

    A folder gives its files (not hidden ones; with `recursive`, its sub-folders' too) as
    (file, path relative to that folder); a file gives (file, its name); "-" reads one path a line
    from `stdin`. A missing path becomes a problem line instead of stopping the run. Files that would
    share an output name (c/a/face.jpg and c/b/face.jpg) keep their paths below their common folder
    (a/face.jpg, b/face.jpg), so that no output overwrites another.
    """
    files, problems = _collect(inputs, recursive, stdin)
    while True:  # a renamed file may clash with another input's name in turn (c/a/face.jpg and c2/a/face.jpg)
        by_name = {}
        for path, relative in files:
            by_name.setdefault(relative, []).append(path)
        clashes = {relative: paths for relative, paths in by_name.items()
                   if len(set(p.resolve() for p in paths)) > 1}
        if not clashes:
            return files, problems
        renamed = {}
        for paths in clashes.values():
            common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
            renamed.update({path: path.resolve().relative_to(common) for path in paths})
        files = [(path, renamed.get(path, relative)) for path, relative in files]


def _collect(inputs, recursive, stdin):
    files, problems = [], []
    for item in inputs:
        if str(item) == "-":
            # Names may begin or end with spaces: only the line break is taken off.
            lines = [line for line in (stdin or sys.stdin).read().splitlines() if line.strip()]
            found, missing = _collect(lines, recursive, None)
            files += found
            problems += missing
            continue
        path = Path(item)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            visible = [p for p in pattern if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            files += sorted((p, p.relative_to(path)) for p in visible if p.is_file())
            problems += sorted(f"{p}: a broken link" for p in visible if p.is_symlink() and not p.exists())
        elif path.is_file():
            files.append((path, Path(path.name)))
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems
