import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.cli import app
from facegen_cli.data import read_dataset
from facegen_cli.attributes import EXCLUSIVE
from facegen_cli.synthfaces import LANDMARK_NAMES, render_face, sample_independent_labels, sample_labels


def test_same_seed_same_pixels_labels_and_landmarks():
    a, b = render_face(7, 64), render_face(7, 64)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], render_face(8, 64)[0])
    image, labels, points = a
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert list(labels) == DEFAULT_ATTRIBUTES and list(points) == LANDMARK_NAMES


def test_landmarks_are_where_a_face_has_them():
    for seed in range(20):
        _, _, p = render_face(seed, 128)
        assert p["left_eye"][0] < p["nose_tip"][0] < p["right_eye"][0]
        assert p["left_brow_inner"][1] < p["left_eye"][1] < p["nose_tip"][1] < p["nose_base"][1]
        assert p["nose_base"][1] < p["upper_lip"][1] < p["lower_lip"][1] < p["jaw_4"][1]
        assert p["mouth_left"][0] < p["upper_lip"][0] < p["mouth_right"][0]
        assert p["hairline_center"][1] < p["left_brow_inner"][1]
        eye_distance = p["right_eye"][0] - p["left_eye"][0]
        assert 22 < eye_distance < 34  # CelebA's aligned framing: eyes 22% of the width apart at 128 px
        assert all(0 <= v < 128 for xy in p.values() for v in xy)


def test_labels_drive_the_pixels():
    """Forcing one attribute on and off (same seed otherwise) changes the pixels where it belongs."""
    base = sample_labels(np.random.default_rng(3))
    base = {**base, "bald": False, "wearing_hat": False, "eyeglasses": False, "mustache": False}
    for attribute, region in {"eyeglasses": ("left_eye", 10), "mustache": ("upper_lip", 6),
                              "smiling": ("upper_lip", 8)}.items():
        off, _, points = render_face(3, 128, {**base, attribute: False})
        on, labels, _ = render_face(3, 128, {**base, attribute: True})
        assert labels[attribute]
        x, y = (int(round(v)) for v in points[region[0]])
        r = region[1]
        near = np.abs(on[y - r:y + r, x - r:x + r].astype(int) - off[y - r:y + r, x - r:x + r]).mean()
        far = np.abs(on[:12, :12].astype(int) - off[:12, :12]).mean()  # background corner
        assert near > 10 and far < 1, (attribute, near, far)


def test_frequencies_are_celeba_like_and_every_attribute_occurs():
    rng = np.random.default_rng(0)
    labels = np.array([[d[a] for a in DEFAULT_ATTRIBUTES] for d in (sample_labels(rng) for _ in range(4000))])
    rate = dict(zip(DEFAULT_ATTRIBUTES, labels.mean(0)))
    assert 0.35 < rate["male"] < 0.55 and 0.6 < rate["young"] < 0.85 and 0.4 < rate["smiling"] < 0.56
    assert all(rate[a] > 0.02 for a in DEFAULT_ATTRIBUTES)
    male = labels[:, 0]
    beard = labels[:, DEFAULT_ATTRIBUTES.index("beard")]
    assert beard[male].mean() > 10 * beard[~male].mean() > 0  # beards mostly on men, but not only
    for a, b in EXCLUSIVE:  # the pairs that attributes.EXCLUSIVE lists never occur
        assert not (labels[:, DEFAULT_ATTRIBUTES.index(a)] & labels[:, DEFAULT_ATTRIBUTES.index(b)]).any()


def test_independent_labels_have_no_dependencies_but_keep_the_impossible_pairs_out():
    rng = np.random.default_rng(0)
    draws = [sample_independent_labels(rng) for _ in range(8000)]
    labels = np.array([[d[a] for a in DEFAULT_ATTRIBUTES] for d in draws])
    rate = dict(zip(DEFAULT_ATTRIBUTES, labels.mean(0)))
    assert all(0.45 < rate[a] < 0.55 for a in ("male", "young", "smiling", "eyeglasses", "beard", "mustache"))
    assert 0.3 < rate["black_hair"] < 0.37 and 0.3 < rate["blond_hair"] < 0.37 and 0.22 < rate["bald"] < 0.28
    male, beard = labels[:, 0], labels[:, DEFAULT_ATTRIBUTES.index("beard")]
    assert abs(beard[male].mean() - beard[~male].mean()) < 0.04  # a beard says nothing about the sex
    for a, b in EXCLUSIVE:
        assert not (labels[:, DEFAULT_ATTRIBUTES.index(a)] & labels[:, DEFAULT_ATTRIBUTES.index(b)]).any()


def test_synth_with_independent_labels_renders_what_it_lists(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "synth"), "-n", "6", "--size", "32",
                                      "--workers", "1", "--labels", "independent"])
    assert result.exit_code == 0, result.stderr
    pixels, labels, _ = render_face(2, 32, label_distribution="independent")
    assert read_dataset(tmp_path / "synth").labels[2].tolist() == [1 if labels[a] else -1 for a in DEFAULT_ATTRIBUTES]
    on_disk = np.asarray(Image.open(tmp_path / "synth" / "img_align_celeba" / "000003.jpg")).astype(int)
    other = render_face(3, 32, label_distribution="independent")[0]
    assert np.abs(on_disk - pixels).mean() < np.abs(on_disk - other).mean() / 3  # its own face, up to JPEG
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "other"), "-n", "1", "--labels", "uniform"])
    assert result.exit_code == 1 and "unknown label distribution 'uniform'" in result.stderr


def test_synth_writes_a_celeba_layout_that_the_celeba_loader_reads(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "synth"), "-n", "40", "--size", "64",
                                      "--workers", "1", "--seed", "5"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "synth")
    data = read_dataset(tmp_path / "synth")
    assert len(data.paths) == 40 and data.attributes == DEFAULT_ATTRIBUTES
    train = read_dataset(tmp_path / "synth", split="train")
    assert len(train.paths) == 36
    # The labels on disk are the renderer's (No_Beard inverted back to beard).
    _, labels, points = render_face(5 + 3, 64)
    assert data.labels[3].tolist() == [1 if labels[a] else -1 for a in DEFAULT_ATTRIBUTES]
    lines = (tmp_path / "synth" / "list_landmarks.txt").read_text().splitlines()
    assert lines[1].split() == LANDMARK_NAMES
    values = [float(v) for v in lines[2 + 3].split()[1:]]
    assert values[:2] == pytest.approx(points["left_eye"], abs=0.01)


def test_the_canonical_framing_is_the_built_in_faces_mean_geometry():
    """landmarks.CANONICAL_POINTS (what every photo is aligned to) are where the renderer puts the eyes and
    mouth corners of its mean face: change one and this says the other must follow."""
    from facegen_cli.landmarks import CANONICAL_POINTS, CANONICAL_SIZE, MESH_POINTS
    from facegen_cli.synthfaces import FaceGeometry

    class Mean:  # every draw at its mean
        def normal(self, mean, std):
            return mean

    g = FaceGeometry(Mean(), {"male": True})
    mean_face = {"left_eye": (g.cx - g.eye_dx, g.eye_y), "right_eye": (g.cx + g.eye_dx, g.eye_y),
                 "mouth_left": (g.cx - g.mouth_w, g.mouth_y), "mouth_right": (g.cx + g.mouth_w, g.mouth_y)}
    for name, (x, y) in CANONICAL_POINTS.items():
        assert (x, y) == pytest.approx((mean_face[name][0] * CANONICAL_SIZE, mean_face[name][1] * CANONICAL_SIZE))
    assert list(MESH_POINTS) == LANDMARK_NAMES  # MediaPipe's points carry the same names, in the same order


def test_synth_never_writes_over_what_it_did_not_make(tmp_path):
    runner = CliRunner()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "000001.jpg").write_bytes(b"my photo")
    for flags in ([], ["--overwrite"]):
        result = runner.invoke(app, ["data", "synth", str(mine), "-n", "2", "--size", "32", "--workers", "1", *flags])
        assert result.exit_code != 0 and "holds files that are not a data set" in result.stderr
    assert (mine / "000001.jpg").read_bytes() == b"my photo"
    data = tmp_path / "data"
    args = ["data", "synth", str(data), "-n", "2", "--size", "32", "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args + ["--seed", "5"])
    assert again.exit_code != 0 and "holds a data set; --overwrite replaces it" in again.stderr
    assert runner.invoke(app, args + ["--seed", "5", "--overwrite"]).exit_code == 0
