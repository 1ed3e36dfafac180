"""The shipped demo model (built-in faces): it is in the package, small, and works with --model demo, no download."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_shipped_in_float16
from facegen_cli.cli import app
from facegen_cli.pipeline import DEMO_MODEL, FacegenPipeline


def test_the_demo_ships_in_float16_within_30_mb():
    assert_shipped_in_float16(DEMO_MODEL, 30)
    info = json.loads((DEMO_MODEL / "facegen.json").read_text())
    assert info["preset"] == "demo" and info["image_size"] == 128


def test_generate_with_the_shipped_model_through_the_cli(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--model", "demo", "--male", "--beard", "-n", "2", "--seed", "0",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 2
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (128, 128)
            assert np.asarray(image).std() > 20  # a picture, not a flat field


def test_the_demo_classifier_reads_what_the_demo_was_asked_for():
    """End to end on fixed seeds: faces asked for --male --beard read as such (the two attributes the
    demo controls best at its default guidance; docs/demo-eval/report.md has them all)."""
    from facegen_cli.attributes import AttributeRequest
    from facegen_cli.classifier import load_classifier

    pipe = FacegenPipeline.load("demo")
    classifier, report = load_classifier(DEMO_MODEL / "classifier")
    assert min(report["test_accuracy"].values()) > 0.9
    y = AttributeRequest(pipe.attributes, ["male", "beard"]).condition()[0]
    readings = classifier.predict(pipe.generate(y, seeds=list(range(6))))
    asked = [pipe.attributes.index(a) for a in ("male", "beard")]
    assert (readings[:, asked] == 1).float().mean() >= 0.8, readings[:, asked]


def test_shipped_models_are_found_by_name_and_the_real_face_model_is_the_default(tmp_path, monkeypatch):
    from facegen_cli.errors import FacegenError
    from facegen_cli.pipeline import FACES_MODEL, model_path

    assert model_path("demo") == DEMO_MODEL and model_path("faces") == FACES_MODEL
    assert model_path(None) == (FACES_MODEL if (FACES_MODEL / "facegen.json").is_file() else DEMO_MODEL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a folder of that name (say generate's output) does not shadow the name...
    assert model_path("demo") == DEMO_MODEL and FacegenPipeline.load("demo").path == DEMO_MODEL
    assert model_path("./demo").resolve() == tmp_path / "demo"  # ...and is reached as a path
    assert model_path(Path("demo")).resolve() == tmp_path / "demo"
    with pytest.raises(FacegenError, match="not a facegen model"):
        FacegenPipeline.load("./demo")


def test_generates_own_output_folder_does_not_shadow_the_model_of_that_name(tmp_path, monkeypatch):
    """`facegen generate` writes into ./faces by default; the command run again with --model faces (as the
    UI shows it) still finds the shipped model."""
    from typer.testing import CliRunner

    from facegen_cli.cli import app
    from facegen_cli.pipeline import FACES_MODEL

    if not (FACES_MODEL / "facegen.json").is_file():
        pytest.skip("this installation ships no faces model")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for seed in ("1", "2"):
        result = runner.invoke(app, ["generate", "--model", "faces", "-n", "1", "--steps", "1", "--seed", seed])
        assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "faces").glob("*.png"))) == 2
