import json

import numpy as np

import pytest
import torch

from facegen_cli.classifier import ClassifierTrainConfig, fit_classifier, save_classifier
from facegen_cli.errors import FacegenError
from facegen_cli.evaluate import (control_rates, free_flip_ceiling, held_flip_agreement, held_flip_requests,
                                  leakage_matrix, off_diagonal_mean, read_held_flips, read_single_attribute_faces,
                                  single_attribute_requests)

A, K = 5, 200


def seed_bits(seeds):
    """Each seed's own random reading of every attribute: what a face shows when nothing is asked."""
    return torch.stack([torch.randint(0, 2, (A,), generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds])


def faithful_generator(y, seeds, drawn=None):
    """Shows what was asked and, for free attributes, what the seed gives; 'images' carry the attributes.
    (`drawn`, the held readings guided from, makes no difference to it.)"""
    shown = torch.where(y != 0, y.sign().long(), seed_bits(seeds))
    return shown.float().view(len(seeds), 1, A, 1).expand(-1, 3, -1, A)


def careless_generator(y, seeds, drawn=None):
    """Ignores the request entirely."""
    return faithful_generator(torch.zeros_like(y), seeds)


def perfect_classifier(images):
    return images[:, 0, :, 0].sign().long()


def perfect_reader(images):
    """(readings, features), as AttributeClassifier.read gives them."""
    return perfect_classifier(images), images[:, 0, :, 0]


def test_single_attribute_requests_ask_each_attribute_alone_both_ways():
    requests = single_attribute_requests(3)
    assert requests.tolist() == [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]


def test_a_faithful_generator_has_full_control_and_no_leakage():
    readings, features, images = read_single_attribute_faces(faithful_generator, perfect_reader, A, list(range(K)))
    assert readings.shape == (A, 2, K, A) and features.shape == (A, 2, K, A) and images.shape == (A, 2, K, 3, A, A)
    assert torch.equal(control_rates(readings), torch.ones(A, 2))
    leakage = leakage_matrix(readings)
    assert torch.equal(leakage, torch.eye(A))  # only the flipped attribute changes, always
    assert torch.equal(off_diagonal_mean(leakage), torch.zeros(A))


def test_a_generator_that_ignores_labels_scores_chance():
    readings, _, _ = read_single_attribute_faces(careless_generator, perfect_reader, A, list(range(K)))
    control = control_rates(readings)
    assert ((control - 0.5).abs() < 0.12).all(), control
    assert torch.equal(leakage_matrix(readings), torch.zeros(A, A))  # nothing flips, not even the asked one


def leaky_generator(y, seeds, drawn=None):
    """Faithful, except that attribute 1 always shows what attribute 0 shows (entangled)."""
    images = faithful_generator(y, seeds).clone()
    images[:, :, 1] = images[:, :, 0]
    return images


def test_held_flip_requests_keep_the_readings_and_take_away_what_the_flip_rules_out():
    exclusive = torch.zeros(A, A, dtype=torch.bool)
    exclusive[2, 3] = exclusive[3, 2] = True  # say 2 and 3 are two hair colours
    shown = torch.tensor([[1, -1, -1, 1, 1], [-1, 1, -1, -1, 1]])
    requests, compared = held_flip_requests(shown, 2, 1, exclusive)
    assert requests.tolist() == [[1, -1, 1, -1, 1], [-1, 1, 1, -1, 1]]  # face 0 loses attribute 3
    assert compared.tolist() == [[True, True, False, False, True], [True, True, False, True, True]]
    requests, compared = held_flip_requests(shown, 3, -1, exclusive)  # taking one away rules nothing out
    assert requests.tolist() == [[1, -1, -1, -1, 1], [-1, 1, -1, -1, 1]]
    assert compared.tolist() == [[True, True, True, False, True]] * 2


def test_held_flips_of_a_faithful_generator_change_only_the_flipped_attribute():
    exclusive = torch.zeros(A, A, dtype=torch.bool)
    exclusive[2, 3] = exclusive[3, 2] = True
    seeds = list(range(K))
    readings, _, _ = read_single_attribute_faces(faithful_generator, perfect_reader, A, seeds)
    flipped, compared, requests, images = read_held_flips(faithful_generator, perfect_reader, readings, seeds,
                                                          exclusive)
    assert flipped.shape == compared.shape == requests.shape == (A, 2, K, A) and images.shape == (A, 2, K, 3, A, A)
    assert torch.equal(control_rates(flipped), torch.ones(A, 2))
    assert torch.equal(held_flip_agreement(readings, flipped, compared), torch.ones(A))
    # Adding attribute 2 took attribute 3 away exactly where the face before showed it, and that is not compared.
    assert torch.equal(~compared[2, 0, :, 3], readings[2, 1, :, 3] > 0) and compared[2, 0, :, 3].any()
    assert (flipped[2, 0, :, 3] == -1).all()


def test_held_flips_expose_an_entangled_generator():
    seeds = list(range(K))
    readings, _, _ = read_single_attribute_faces(leaky_generator, perfect_reader, A, seeds)
    flipped, compared, _, _ = read_held_flips(leaky_generator, perfect_reader, readings, seeds,
                                              torch.zeros(A, A, dtype=torch.bool))
    agreement = held_flip_agreement(readings, flipped, compared)
    assert agreement[0] == 1 - 1 / (A - 1)  # flipping 0 always drags 1 along: one of the 4 others changes
    assert torch.equal(agreement[1:], torch.ones(A - 1))
    control = control_rates(flipped)
    assert torch.equal(control[0], torch.ones(2)) and ((control[1] - 0.5).abs() < 0.12).all()  # 1 cannot be set


def test_held_flips_are_guided_from_the_held_readings_as_generate_guides():
    """generate(requests, seeds, held): held = the requests less the flip and what it rules out."""
    exclusive = torch.zeros(A, A, dtype=torch.bool)
    exclusive[2, 3] = exclusive[3, 2] = True
    seen = []

    def recording(y, seeds, drawn=None):
        seen.append((y.clone(), drawn.clone()))
        return faithful_generator(y, seeds)

    seeds = list(range(8))
    readings, _, _ = read_single_attribute_faces(faithful_generator, perfect_reader, A, seeds)
    _, compared, requests, _ = read_held_flips(recording, perfect_reader, readings, seeds, exclusive)
    y, held = seen[4]  # attribute 2 added
    assert torch.equal(y, requests[2, 0]) and (held[:, 2] == 0).all()
    assert torch.equal(held != 0, compared[2, 0]) and torch.equal(held[compared[2, 0]], y[compared[2, 0]])


def test_held_flips_the_data_cannot_support_are_counted_apart():
    """Labels where attribute 1 (a beard, say) never shows without attribute 0 (a man): a flip to 1 that
    holds 0 at -1 is unsupported, and the rates over the supported faces leave it out."""
    from facegen_cli.evaluate import rates_where, supported_held_flips, unsupported_pairs
    from facegen_cli.label_prior import LabelPrior

    every = torch.cartesian_prod(*[torch.tensor([-1, 1])] * A)
    labels = every[~((every[:, 1] > 0) & (every[:, 0] < 0))]  # no face with 1 and without 0
    prior = LabelPrior.from_labels([f"a{i}" for i in range(A)], labels)
    frequency = prior.pair_frequency()
    assert frequency.shape == (A, 2, A, 2)
    assert frequency[1, 0, 0, 0] == 1 and frequency[1, 0, 0, 1] == 0  # with 1: always 0
    assert frequency[0, 1, 1, 1] == 1  # without 0: never 1
    assert torch.allclose(frequency[2, 0, 3], torch.tensor([0.5, 0.5], dtype=torch.float64))
    exclusive = torch.zeros(A, A, dtype=torch.bool)
    assert unsupported_pairs(frequency, prior.attributes, exclusive) == [
        "a0 -1 with a1 +1 (0.0%)", "a1 +1 with a0 -1 (0.0%)"]

    seeds = list(range(K))
    readings, _, _ = read_single_attribute_faces(faithful_generator, perfect_reader, A, seeds)
    flipped, compared, requests, _ = read_held_flips(careless_generator, perfect_reader, readings, seeds, exclusive)
    supported = supported_held_flips(frequency, requests, compared)
    assert torch.equal(supported[1, 0], requests[1, 0, :, 0] > 0)  # adding 1: only where 0 is held at +1
    assert supported[2].all() and supported[4].all()
    from facegen_cli.evaluate import supported_requests

    requests_asked = torch.tensor([[-1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, -1, 0]], dtype=torch.float)
    assert supported_requests(frequency, requests_asked).tolist() == [False, True, True]
    rates, faces = rates_where(flipped, supported)
    assert faces[1, 0] == (requests[1, 0, :, 0] > 0).sum() and faces[2, 0] == K
    shown = (flipped[1, 0, :, 1] == 1) & supported[1, 0]
    assert rates[1, 0] == shown.sum() / faces[1, 0]


def test_free_flip_ceiling_is_one_for_independent_labels_and_drops_for_tied_ones():
    every_combination = torch.cartesian_prod(*[torch.tensor([-1, 1])] * A)  # (2^A, A): exactly independent
    assert torch.allclose(free_flip_ceiling(every_combination), torch.ones(A, dtype=torch.float64))
    tied = every_combination.clone()
    tied[:, 1] = tied[:, 0]  # attribute 1 always equals attribute 0
    expected = torch.tensor([1 - 1 / (A - 1)] * 2 + [1.0] * (A - 2), dtype=torch.float64)
    assert torch.allclose(free_flip_ceiling(tied), expected)
    extra = tied[tied[:, 0] > 0].clone()
    extra[:, 4] = 0  # more faces with attribute 0, attribute 4 unknown: left out, not read as absent
    assert torch.allclose(free_flip_ceiling(torch.cat([tied, extra])), expected)


def test_eval_report_through_the_cli(tmp_path, tiny_model_dir, tiny_data):
    from typer.testing import CliRunner

    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.cli import app

    images = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8).numpy()
    labels = torch.randint(0, 2, (16, len(DEFAULT_ATTRIBUTES))) * 2 - 1
    save_classifier(fit_classifier(images, labels, DEFAULT_ATTRIBUTES, ClassifierTrainConfig(epochs=1)), tmp_path / "clf",
                    {"test_accuracy": dict.fromkeys(DEFAULT_ATTRIBUTES, 0.5)})
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--classifier", str(tmp_path / "clf"),
                                      "-k", "2", "--guidance", "1", "--guidance", "3", "--steps", "2",
                                      "--combinations", "2", "--data", str(tiny_data), "--free-faces", "4",
                                      "--inception-weights", str(tmp_path / "no-such-weights.pth"),
                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "report" / "report.md")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["guidance"]) == {"1.0", "3.0"}
    result_g3 = report["guidance"]["3.0"]
    assert len(result_g3["leakage_matrix"]) == len(DEFAULT_ATTRIBUTES)
    assert all(0 <= v["for"] <= 1 and 0 <= v["against"] <= 1 for v in result_g3["control"].values())
    assert "| smiling |" in (tmp_path / "report" / "report.md").read_text()
    held = result_g3["flip_others_held"]
    assert set(held["others_agree"]) == set(DEFAULT_ATTRIBUTES) and all(0 <= v <= 1 for v in held["others_agree"].values())
    # the tiny model carries a label prior: the flips the data supports are counted apart, the rest named
    assert set(held["control_supported"]) == set(held["supported_faces"]) == set(DEFAULT_ATTRIBUTES)
    assert all(0 <= n["for"] <= 2 for n in held["supported_faces"].values()) and 0 <= held["supported_mean"] <= 1
    assert isinstance(report["unsupported_pairs"], list)
    combos = result_g3["combinations"]
    assert len(combos["supported"]) == len(combos["all_asked_shown_per_request"]) == 2
    assert set(report["free_flip_ceiling"]) == set(DEFAULT_ATTRIBUTES)  # from --data's train labels
    real = report["combinations_real"]  # the held-out faces labelled with each request, as the classifier reads them
    assert len(real["faces_per_request"]) == len(real["compared"]) == len(real["all_asked_shown_per_request"]) == 2
    assert all(not ok or n >= 20 for ok, n in zip(real["compared"], real["faces_per_request"]))
    assert all(r is None or 0 <= r <= 1 for r in real["all_asked_shown_per_request"])
    assert "## Combinations beside real faces" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "grids" / "beard-g3.png").is_file()
    assert (tmp_path / "report" / "grids" / "beard-held-g3.png").is_file()
    assert (tmp_path / "report" / "plots" / "leakage.png").is_file() and "frechet_classifier_features" in result_g3
    # The standard FID could not be measured (no weights there): the report says so instead of a number.
    assert "Inception FID unavailable" in result_g3["inception_fid_unavailable"] and "inception_fid" not in result_g3
    assert "Inception FID: not measured" in (tmp_path / "report" / "report.md").read_text()
    free = report["free_faces"]  # the tiny model carries its training labels: drawn from them, and left free
    assert free["faces"] == 4 and set(free) == {"faces", "real", "prior", "free"}
    assert all(set(free[k]) == {"frechet_classifier"} for k in ("real", "prior", "free"))
    assert "## Faces with nothing asked" in (tmp_path / "report" / "report.md").read_text()


def test_free_face_figures_put_real_faces_at_the_floor_in_both_embeddings(tiny_model_dir):
    """Real faces against other real faces score below a model that draws no faces, in the classifier's
    features and in dlib's embedding (where the model's blobs, in which dlib finds no face, are embedded in
    the real faces' typical box)."""
    pytest.importorskip("dlib")
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.evaluate import free_face_figures
    from facegen_cli.pipeline import FacegenPipeline
    from facegen_cli.synthfaces import render_face

    pipe = FacegenPipeline.load(tiny_model_dir)
    drawn = [render_face(seed) for seed in range(16)]
    real = np.stack([image for image, _, _ in drawn])
    labels = torch.tensor([[1 if face[a] else -1 for a in DEFAULT_ATTRIBUTES] for _, face, _ in drawn])
    classifier = fit_classifier(real, labels, DEFAULT_ATTRIBUTES, ClassifierTrainConfig(epochs=2))
    figures = free_face_figures(pipe, classifier, real,
                                seeds=list(range(8)), settings=pipe.settings(steps=2), identity=True)
    for space in ("frechet_classifier", "frechet_dlib"):
        assert 0 <= figures["real"][space] < min(figures["free"][space], figures["prior"][space])
    with pytest.raises(FacegenError, match="need 16 held-out faces"):
        free_face_figures(pipe, None, real[:10], seeds=list(range(8)), settings=pipe.sample)


def test_eval_without_a_classifier_is_a_clear_error(tiny_model_dir):
    from typer.testing import CliRunner

    from facegen_cli.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "carries no classifier" in result.stderr


def test_combination_requests_are_2_to_4_attributes_and_never_contradictory():
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.attributes import EXCLUSIVE
    from facegen_cli.evaluate import combination_requests

    requests = combination_requests(DEFAULT_ATTRIBUTES, 200)
    assert torch.equal(requests, combination_requests(DEFAULT_ATTRIBUTES, 200))  # fixed seed
    sizes = (requests != 0).sum(1)
    assert sizes.min() == 2 and sizes.max() == 4
    for y in requests:
        wanted = {DEFAULT_ATTRIBUTES[i] for i in torch.nonzero(y > 0).flatten().tolist()}
        assert not any(pair <= wanted for pair in EXCLUSIVE)


def test_real_combination_control_reads_the_real_faces_labelled_with_each_request():
    from facegen_cli.evaluate import real_combination_control

    labels = torch.tensor([[1, -1], [1, -1], [1, 1], [-1, -1], [1, 0]])  # 0: unknown, never agrees
    readings = torch.tensor([[1, -1], [1, 1], [1, 1], [-1, -1], [1, -1]])
    requests = torch.tensor([[1.0, -1.0], [-1.0, 0.0], [-1.0, 1.0]])
    rates, faces = real_combination_control(readings, labels, requests)
    assert faces.tolist() == [2, 1, 0]
    assert rates[:2].tolist() == [0.5, 1.0] and rates[2].isnan()  # faces 0, 1: the second read with it


def test_combination_control_of_faithful_and_careless_generators():
    from facegen_cli.evaluate import combination_control

    requests = torch.tensor([[1, -1, 0, 0, 0], [0, 0, 1, 1, -1]]).float()
    faithful = torch.stack([perfect_classifier(faithful_generator(y, list(range(K)))) for y in requests])
    assert combination_control(faithful, requests) == (1.0, 1.0)
    careless = torch.stack([perfect_classifier(careless_generator(y, list(range(K)))) for y in requests])
    all_shown, each_shown = combination_control(careless, requests)
    assert abs(each_shown - 0.5) < 0.1 and all_shown < 0.35


def test_frechet_distance_and_diversity_on_known_gaussians():
    from facegen_cli.evaluate import condition_diversity, frechet_distance, mean_pairwise_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, b) < 0.02
    assert abs(frechet_distance(a, b + torch.tensor([2.0, 0, 0])) - 4.0) < 0.1  # |mu|^2
    assert abs(frechet_distance(a, 2 * b) - 3.0) < 0.1  # 3 * (1 + 4 - 2 * 2)
    same = torch.zeros(10, 3)
    assert mean_pairwise_distance(same) == 0 and mean_pairwise_distance(a[:500]) > 1.5
    # Per condition of (A, 2, K, D) features, averaged: one varied condition among 4 identical ones.
    conditions = torch.zeros(2, 2, 50, 3)
    conditions[1, 0] = a[:50]
    assert abs(condition_diversity(conditions) - mean_pairwise_distance(a[:50]) / 4) < 1e-9


def test_inception_fid_through_torchmetrics_matches_our_frechet_distance_on_the_same_features():
    """torchmetrics' FID path, with a small pooling network standing in for Inception (no weights offline)."""
    from facegen_cli.evaluate import frechet_distance, inception_fid_to

    class PooledColours(torch.nn.Module):
        num_features = 12

        def forward(self, uint8_images):
            return torch.nn.functional.adaptive_avg_pool2d(uint8_images.double() / 255, 2).flatten(1)

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    generated = (real // 2 + np.array([100, 20, 60], dtype=np.uint8)).astype(np.uint8)  # darker, tinted, flatter
    features = lambda images: PooledColours()(torch.from_numpy(images).permute(0, 3, 1, 2))  # noqa: E731
    expected = frechet_distance(features(real), features(generated))
    fid = inception_fid_to(real, feature=PooledColours(), batch_size=24)
    assert expected > 0.01 and fid(generated) == pytest.approx(expected, rel=1e-4)
    assert fid(real) == pytest.approx(0, abs=1e-6)  # the previous generated set is forgotten, the real one kept
    assert fid(generated) == pytest.approx(expected, rel=1e-4)


def test_inception_fid_without_its_weights_is_a_clear_error(tmp_path):
    from facegen_cli.errors import FacegenError
    from facegen_cli.evaluate import inception_fid_to

    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(FacegenError, match="Inception FID unavailable"):
        inception_fid_to(images, weights=tmp_path / "missing.pth")


def test_inception_fid_offline_never_tries_the_network(tmp_path, monkeypatch, capfd):
    """Offline and not cached: said in one line, and no "Downloading ..." from torch hub on stderr."""
    import torch
    from huggingface_hub import constants

    from facegen_cli.errors import FacegenError
    from facegen_cli.evaluate import inception_fid_to

    pytest.importorskip("torch_fidelity")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FacegenError, match="offline .* give --inception-weights"):
        inception_fid_to(np.zeros((4, 16, 16, 3), dtype=np.uint8))
    assert "Downloading" not in capfd.readouterr().err


def test_locality_metrics_are_infinite_and_one_for_untouched_pixels():
    from facegen_cli.evaluate import global_ssim, psnr_uint8

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr_uint8(image, image) == float("inf") and global_ssim(image, image) == 1.0
    noisy = np.clip(image.astype(int) + 8, 0, 255).astype(np.uint8)
    assert 25 < psnr_uint8(noisy, image) < 40 and global_ssim(noisy, image) < 1.0


def test_edit_locality_on_built_in_faces_keeps_the_outside_exact(tiny_model_dir):
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.classifier import AttributeClassifier
    from facegen_cli.config import SampleConfig
    from facegen_cli.edit_request import EditRequest
    from facegen_cli.evaluate import HeldOutFaces, edit_locality
    from facegen_cli.pipeline import FacegenPipeline
    from facegen_cli.synthfaces import render_face

    faces = [render_face(seed, 128) for seed in range(6)]
    labels = torch.tensor([[1 if f[1][a] else -1 for a in DEFAULT_ATTRIBUTES] for f in faces])
    held_out = HeldOutFaces(np.stack([f[0] for f in faces]), labels, [f[2] for f in faces])
    result = edit_locality(FacegenPipeline.load(tiny_model_dir), AttributeClassifier(attributes=DEFAULT_ATTRIBUTES),
                           held_out, EditRequest(sample=SampleConfig(steps=1)), num_faces=2)
    assert set(result) == {a for i, a in enumerate(DEFAULT_ATTRIBUTES) if (labels[:, i] < 0).any()}
    for r in result.values():
        assert r["psnr_outside"] == float("inf") and r["ssim_outside"] == 1.0 and r["pixels_changed_outside"] == 0
        assert 0 <= r["success"] <= 1 and 0 <= r["others_changed"] <= 1
        assert r["texture_ratio"] >= 0 and r["texture_ratio_before"] > 0


def test_high_frequency_ratio_tells_a_smooth_patch_from_the_grain_around_it():
    from facegen_cli.evaluate import high_frequency_ratio

    rng = np.random.default_rng(0)
    grain = rng.integers(60, 200, (2, 64, 64, 3)).astype(np.uint8)
    masks = np.zeros((2, 64, 64), dtype=np.float32)
    masks[:, 20:40, 20:40] = 1
    assert high_frequency_ratio(grain, masks) == pytest.approx(1.0, abs=0.1)  # same grain inside and out
    smooth = grain.copy()
    smooth[:, 20:40, 20:40] = 128
    assert high_frequency_ratio(smooth, masks) < 0.3  # a flat patch: little energy inside


def test_a_test_split_of_one_face_is_refused_before_any_sampling(tmp_path):
    from conftest import write_labelled_folder
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.errors import FacegenError
    from facegen_cli.evaluate import frechet_distance, load_held_out_faces

    data = write_labelled_folder(tmp_path / "data", 1)  # a folder without a partition file: all of it is the test split
    with pytest.raises(FacegenError, match="test split holds 1 readable face"):
        load_held_out_faces(data, DEFAULT_ATTRIBUTES, 64)
    with pytest.raises(FacegenError, match="at least 2 faces on each side"):
        frechet_distance(torch.randn(1, 8), torch.randn(5, 8))
