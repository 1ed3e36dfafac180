import numpy as np
import pytest
import torch

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.classifier import (ClassifierTrainConfig, accuracy, balanced_accuracy, fit_classifier, load_classifier,
                                    save_classifier)
from facegen_cli.images import to_tensor
from facegen_cli.synthfaces import render_face


@pytest.fixture(scope="module")
def rendered_faces():
    """2,500 built-in faces at 64 px with their exact labels (+1/-1)."""
    faces = [render_face(seed, 64) for seed in range(2500)]
    images = np.stack([image for image, _, _ in faces])
    labels = torch.tensor([[1 if labels[a] else -1 for a in DEFAULT_ATTRIBUTES] for _, labels, _ in faces])
    return images, labels


def test_labels_are_learnable_to_95_percent_per_attribute(rendered_faces):
    """The renderer's labels are what the pixels show: a small CNN trained on 2,000 faces reads
    every attribute of 500 others right at least 95% of the time."""
    images, labels = rendered_faces
    model = fit_classifier(images[:2000], labels[:2000], DEFAULT_ATTRIBUTES, ClassifierTrainConfig(epochs=16))
    scores = accuracy(model.predict(to_tensor(images[2000:])), labels[2000:])
    report = dict(zip(DEFAULT_ATTRIBUTES, scores.tolist()))
    assert min(report.values()) >= 0.95, report


def test_accuracy_ignores_unknown_labels():
    predictions = torch.tensor([[1, -1], [1, 1]])
    labels = torch.tensor([[1, 0], [-1, 1]])
    assert accuracy(predictions, labels).tolist() == [0.5, 1.0]


def test_balanced_accuracy_gives_a_reader_that_always_says_no_one_half():
    labels = torch.tensor([[1], [-1], [-1], [-1], [0]])
    always_no = torch.full((5, 1), -1)
    assert accuracy(always_no, labels).item() == 0.75 and balanced_accuracy(always_no, labels).item() == 0.5
    assert balanced_accuracy(torch.tensor([[1], [-1], [1], [-1], [1]]), labels).item() == pytest.approx((1 + 2 / 3) / 2)


def test_save_load_round_trip(tmp_path, rendered_faces):
    images, labels = rendered_faces
    model = fit_classifier(images[:64], labels[:64], DEFAULT_ATTRIBUTES, ClassifierTrainConfig(epochs=1))
    save_classifier(model, tmp_path / "clf", {"test_accuracy": {}})
    loaded, report = load_classifier(tmp_path / "clf")
    x = to_tensor(images[64:80])
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert loaded.attributes == DEFAULT_ATTRIBUTES and report == {"test_accuracy": {}}


def test_typical_logits_are_what_most_real_faces_with_and_without_an_attribute_read_beyond():
    from types import SimpleNamespace

    from facegen_cli.classifier import typical_logits

    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [-8.0, 0.0], [-4.0, 0.0]])
    model = SimpleNamespace(attributes=["male", "beard"], logits=lambda images: logits)
    labels = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0], [-1, 0], [-1, 0]])
    # three in four of the faces with it read above 1.75, and of those without, below -5
    assert typical_logits(model, None, labels) == {"with": {"male": 1.75}, "without": {"male": -5.0}}


def test_train_classifier_through_the_cli_measures_it_on_every_test_split(tmp_path):
    from typer.testing import CliRunner

    from facegen_cli.classifier import held_out_accuracy, typical_logits
    from facegen_cli.cli import app
    from facegen_cli.data import load_images_and_labels
    from facegen_cli.synthfaces import write_dataset

    celeba = write_dataset(tmp_path / "celeba", 60, size=32, workers=1)
    independent = write_dataset(tmp_path / "independent", 60, size=32, seed=100, workers=1,
                                label_distribution="independent")
    result = CliRunner().invoke(app, ["eval", "train-classifier", "--data", str(independent), "--test-data",
                                      str(celeba), "--epochs", "1", "--image-size", "16", "--out",
                                      str(tmp_path / "clf"), "--balanced", "--widths", "8,8,16,16"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "clf")
    model, report = load_classifier(tmp_path / "clf")
    assert report["train_images"] == 54 and report["test_images"] == 3
    # What it saved is what the classifier scores on those test splits.
    assert report["test_accuracy"] == held_out_accuracy(model, independent)[0]
    assert report["test_balanced_accuracy"] == held_out_accuracy(model, independent)[2]
    assert report["balanced_loss"] is True and model.config.widths == [8, 8, 16, 16]
    assert report["other_test_accuracy"] == {celeba.name: held_out_accuracy(model, celeba)[0]}  # named, not a path
    assert report["data"] == independent.name
    images, labels, _ = load_images_and_labels(independent, "test", 128)
    assert model.config.typical_logits == typical_logits(model, to_tensor(images), labels)  # kept in its config
    assert f"held-out accuracy on {celeba}" in result.stderr

    result = CliRunner().invoke(app, ["eval", "train-classifier", "--data", str(independent), "--test-data",
                                      str(tmp_path / "missing"), "--out", str(tmp_path / "clf2")])
    assert result.exit_code == 1 and "no such data folder" in result.stderr
