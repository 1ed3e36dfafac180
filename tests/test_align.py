import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facegen_cli.align import partition_of, read_labels
from facegen_cli.cli import app
from facegen_cli.data import read_dataset
from facegen_cli.layout import read_landmarks
from facegen_cli.landmarks import CANONICAL_POINTS, align_face, alignment
from facegen_cli.synthfaces import render_face

runner = CliRunner()
COLUMNS = ["5_o_Clock_Shadow", "Male", "No_Beard", "Smiling"]  # a few of CelebA's 40, in its spelling


def write_photo(path, seed, photo_size, face_size):
    """A built-in face inside a larger picture, the whole scaled to `photo_size` (w, h)."""
    face = Image.fromarray(render_face(seed, face_size)[0])
    photo = Image.new("RGB", (int(face_size * 1.4), int(face_size * 1.25)), (90, 120, 150))
    photo.paste(face, (int(face_size * 0.2), int(face_size * 0.1)))
    photo.resize(photo_size, Image.Resampling.LANCZOS).save(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The shared CelebA folder's shape: photos in two sub-folders, the labels kept apart from them."""
    root = tmp_path_factory.mktemp("celeba")
    (root / "small").mkdir()
    (root / "large").mkdir()
    write_photo(root / "small" / "000001.jpg", 1, (89, 109), 256)  # as small as CelebA's aligned-half
    write_photo(root / "large" / "182638.jpg", 2, (420, 380), 256)
    write_photo(root / "large" / "182639.png", 3, (300, 300), 192)
    Image.new("RGB", (200, 200), (30, 160, 60)).save(root / "large" / "182640.jpg")  # no face
    (root / "large" / "182641.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows = {"000001.jpg": [-1, 1, -1, 1], "182638.jpg": [1, -1, 1, -1], "182639.png": [-1, -1, 1, 1],
            "182640.jpg": [1, 1, 1, 1], "182641.jpg": [-1, -1, -1, -1], "199999.jpg": [1, 1, 1, 1]}  # last: no file
    lines = [str(len(rows)), " ".join(COLUMNS)] + [f"{n} " + " ".join(f"{v:2d}" for v in r) for n, r in rows.items()]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root, rows


def test_align_writes_a_celeba_folder_and_accounts_for_every_photo(tmp_path, source):
    pytest.importorskip("mediapipe")
    root, rows = source
    out = tmp_path / "aligned"
    result = runner.invoke(app, ["data", "align", str(root), str(out), "--attributes", str(root / "labels.txt"),
                                 "--workers", "1"])
    assert result.exit_code == 1  # three photos could not be aligned, and the exit code says so
    assert result.stdout.strip() == str(out)
    assert "3 of 6 aligned, 1 no face, 1 unreadable, 1 not found" in result.stderr
    problems = (out / "not_aligned.txt").read_text()
    assert "182640.jpg no face found" in problems and "182641.jpg cannot read" in problems
    assert "199999.jpg not found" in problems

    columns, labels = read_labels(out / "list_attr_celeba.txt")
    assert columns == COLUMNS  # every column carried over, not only the model's 12
    assert labels == {"000001.png": rows["000001.jpg"], "182638.png": rows["182638.jpg"],
                      "182639.png": rows["182639.png"]}
    data = read_dataset(out)  # the other commands read it unchanged
    assert len(data.paths) == 3 and data.labels[0, data.attributes.index("male")] == 1
    assert data.labels[0, data.attributes.index("beard")] == 1  # No_Beard -1
    for path in data.paths:
        assert Image.open(path).size == (128, 128)
    # The aligned landmarks sit on the canonical framing, whatever the photo's size and scale.
    for points in read_landmarks(out).values():
        for name, (x, y) in CANONICAL_POINTS.items():
            assert abs(points[name][0] - x) < 4 and abs(points[name][1] - y) < 4
    assert {line.split()[0] for line in (out / "list_eval_partition.txt").read_text().splitlines()} == set(labels)

    # Resuming does nothing twice; a lost output is made again, identical.
    first = (out / "img_align_celeba" / "182638.png").read_bytes()
    (out / "img_align_celeba" / "182638.png").unlink()
    again = runner.invoke(app, ["data", "align", str(root), str(out), "--attributes", str(root / "labels.txt"),
                                "--workers", "1"])
    assert "resuming: 4 of 5 photos already done" in again.stderr
    assert (out / "img_align_celeba" / "182638.png").read_bytes() == first


def test_a_photo_mediapipe_stops_on_is_listed_and_the_others_are_aligned(tmp_path, source, monkeypatch):
    """Once, an abort inside MediaPipe took `data align`'s worker pool down (BrokenProcessPool), and a
    resumed run met the same photo again. Now it is that photo's error, journalled, and not tried again."""
    import os
    import signal

    from facegen_cli import align

    pytest.importorskip("mediapipe")
    root, _ = source
    real = align.find_main_face

    def aborting_on_the_green_photo(finder, image):
        if tuple(image[0, 0]) == (30, 160, 60):  # 182640.jpg, a flat green picture
            finder._ask("faces", image[:16, :16])  # the child up and running, then gone as in an abort
            os.kill(finder.child.pid, signal.SIGABRT)
        return real(finder, image)

    monkeypatch.setattr(align, "find_main_face", aborting_on_the_green_photo)
    out = tmp_path / "aligned"
    arguments = ["data", "align", str(root), str(out), "--attributes", str(root / "labels.txt"), "--workers", "1"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 1
    assert "3 of 6 aligned, 0 no face, 1 unreadable, 1 not found, 1 failed" in result.stderr
    assert "182640.jpg the face finder (MediaPipe) stopped on this image (signal SIGABRT)" in \
        (out / "not_aligned.txt").read_text()
    again = runner.invoke(app, arguments)
    assert "resuming: 5 of 5 photos already done" in again.stderr and "1 failed" in again.stderr


def test_align_refuses_a_folder_without_labels(tmp_path):
    (tmp_path / "photos").mkdir()
    result = runner.invoke(app, ["data", "align", str(tmp_path / "photos"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "--attributes" in result.stderr


def test_partition_is_a_fixed_hash_split():
    splits = [partition_of(f"{i:06d}.jpg", 0.05) for i in range(20000)]
    assert splits == [partition_of(f"{i:06d}.jpg", 0.05) for i in range(20000)]
    assert abs(splits.count(2) / 20000 - 0.05) < 0.01 and abs(splits.count(1) / 20000 - 0.05) < 0.01


def test_align_face_mirrors_the_photo_where_the_frame_reaches_past_its_edge():
    image, _, points = render_face(5, 128)
    photo = Image.fromarray(image[20:, 10:])  # the face's chin and one side near the cut edges
    shifted = {n: (x - 10, y - 20) for n, (x, y) in points.items()}
    crop, matrix, crop_points = align_face(photo, shifted, 128)
    assert np.allclose(matrix, alignment(shifted))
    assert (crop.reshape(-1, 3).max(1) > 0).all()  # no black fill anywhere
    # inside the photo the crop is the plain warp: the face is where the points say
    assert abs(crop_points["left_eye"][0] - CANONICAL_POINTS["left_eye"][0]) < 4


def test_zoomed_alignment_writes_each_photo_as_a_listed_view_of_its_aligned_face(tmp_path, source):
    pytest.importorskip("mediapipe")
    from facegen_cli.framing import Framing, zoom_limit
    from facegen_cli.landmarks import invert, transform_points
    from facegen_cli.layout import read_framings

    root, _ = source
    plain, zoomed = tmp_path / "plain", tmp_path / "zoomed"
    for out, flags in ((plain, []), (zoomed, ["--zoomed"])):
        runner.invoke(app, ["data", "align", str(root), str(out), "--attributes", str(root / "labels.txt"),
                            "--workers", "1", *flags])
    assert not read_framings(plain)
    views = read_framings(zoomed)
    assert set(views) == {"000001.png", "182638.png", "182639.png"}
    assert views["000001.png"] == (1.0, 64.0, 64.0)  # a photo smaller than the framing holds no zoom
    whole, in_view = read_landmarks(plain), read_landmarks(zoomed)
    for name, values in views.items():
        view = Framing(*values)
        assert view.zoom <= zoom_limit(4.0)
        half = 64 / view.zoom  # the view lies inside the aligned crop
        assert half - 1e-3 <= view.cx <= 128 - half + 1e-3 and half - 1e-3 <= view.cy <= 128 - half + 1e-3
        back = transform_points(in_view[name], invert(view.matrix(128)))  # the landmarks are the view's
        for point, (x, y) in whole[name].items():
            assert back[point] == pytest.approx((x, y), abs=0.05)
    assert any(Framing(*v).zoom > 1 for v in views.values())

    again = runner.invoke(app, ["data", "align", str(root), str(zoomed), "--attributes", str(root / "labels.txt"),
                                "--workers", "1"])
    assert again.exit_code == 1 and "was begun with --zoomed" in again.stderr
