"""The shipped real-face model (CelebA): in the package, within 60 MB, the default with no --model."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_shipped_in_float16
from facegen_cli.cli import app
from facegen_cli.pipeline import FACES_MODEL, FacegenPipeline, model_path
from facegen_cli.vae import weights_fingerprint


def test_the_real_face_model_ships_in_float16_within_60_mb_and_is_the_default():
    assert_shipped_in_float16(FACES_MODEL, 60, ("dit", "student", "vae", "classifier"))
    info = json.loads((FACES_MODEL / "facegen.json").read_text())
    assert info["preset"] == "faces-finetune" and info["image_size"] == 128  # the faces model, fine-tuned
    assert model_path(None) == FACES_MODEL
    # it samples with its student, distilled from the DiT beside it, in 4 steps
    pipe = FacegenPipeline.load("faces")
    assert pipe.sample.distilled and pipe.sample.steps == 4 and pipe.student is not None
    assert info["distilled_from"]["fingerprint"] == weights_fingerprint(pipe.dit)
    report = json.loads((FACES_MODEL / "classifier" / "accuracy.json").read_text())
    assert report["balanced_loss"] and min(report["test_balanced_accuracy"].values()) > 0.7


def test_a_new_users_first_command_draws_different_faces(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--female", "--smiling", "-n", "3", "--seed", "0",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 3
    images = [np.asarray(Image.open(p), dtype=np.float32) for p in paths]
    for image in images:
        assert image.shape == (128, 128, 3) and image.std() > 20  # a picture, not a flat field
    assert np.abs(images[0] - images[1]).mean() > 10  # different seeds, different faces
