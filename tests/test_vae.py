import json

import numpy as np
import pytest
import torch

from facegen_cli.errors import FacegenError
from facegen_cli.vae import encode, load_vae, psnr
from facegen_cli.vae_train import VaeTrainConfig, random_crops, train_vae


def test_psnr_of_known_errors():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x + 0.2, x) == pytest.approx(20.0, abs=1e-4)  # error 0.1 of the [0, 1] range
    assert psnr(x, x) == pytest.approx(100.0)  # clamped, not infinite


def test_random_crops_are_windows_of_the_images_on_the_latent_grid():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    crops = random_crops(images, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 16, 16)
    for image, crop in zip(images, crops):
        y, x = divmod(int(crop[0, 0, 0]) - int(image[0, 0, 0]), 32)
        assert y % 8 == 0 and x % 8 == 0 and torch.equal(image[:, y:y + 16, x:x + 16], crop)
    assert random_crops(images, 32, None) is images


def test_train_vae_checkpoints_resumes_and_saves_an_f8_autoencoder(tmp_path, tiny_data):
    out = tmp_path / "vae-run"
    small = dict(batch_size=4, crop_size=64, checkpoint_every=2)
    train_vae(tiny_data, out, VaeTrainConfig(steps=2, **small))
    assert json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())["step"] == 2
    with pytest.raises(FacegenError, match="--resume"):
        train_vae(tiny_data, out, VaeTrainConfig(steps=4, **small))
    value = train_vae(tiny_data, out, VaeTrainConfig(steps=4, **small), resume=True)
    assert json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())["step"] == 4
    vae = load_vae(out / "vae")
    assert encode(vae, torch.zeros(1, 3, 128, 128)).shape == (1, 4, 16, 16)
    assert 0 < value < 100


def test_vae_eval_measures_psnr_and_writes_the_comparison_grid(tmp_path, tiny_data, tiny_vae_dir):
    from PIL import Image
    from typer.testing import CliRunner

    from facegen_cli.cli import app
    from facegen_cli.vae_train import evaluate_vae

    report = evaluate_vae(tiny_vae_dir, tiny_data, "all", tmp_path / "grid.png", columns=4)
    assert report.faces == 24 and 0 < report.psnr < 60 and report.identity_median is None
    with Image.open(tmp_path / "grid.png") as grid:  # 4 faces above 4 reconstructions, 2-px borders
        assert grid.size == (4 * 130 + 2, 2 * 130 + 2)
    result = CliRunner().invoke(app, ["vae", "eval", str(tiny_data), "--vae", str(tiny_vae_dir), "--split", "all"])
    assert result.exit_code == 0 and float(result.stdout.split()[0]) == pytest.approx(report.psnr, abs=1e-3)


def test_identity_figures_are_zero_for_a_perfect_reconstruction_and_grow_with_damage(tmp_path, tiny_data,
                                                                                     tiny_vae_dir):
    from typer.testing import CliRunner

    from facegen_cli.cli import app

    from facegen_cli.synthfaces import render_face, write_dataset
    from facegen_cli.vae_train import IdentityReference

    pytest.importorskip("dlib")
    faces = np.stack([render_face(seed)[0] for seed in range(12)])
    reference = IdentityReference(faces, measured=6)
    perfect = reference.figures(faces.copy())
    assert perfect["identity_faces"] == 6 and perfect["identity_median"] == 0 and perfect["identity_crossed"] == 0
    assert perfect["frechet"] == pytest.approx(perfect["frechet_floor"])
    noise = np.random.default_rng(0).normal(0, 40, faces.shape)
    damaged = reference.figures(np.clip(faces + noise, 0, 255).astype(np.uint8))
    assert damaged["identity_median"] > 0.05 and damaged["frechet"] > perfect["frechet"]
    with pytest.raises(FacegenError, match="at least 4"):
        IdentityReference(faces[:3])
    vae_eval = ["vae", "eval", "--vae", str(tiny_vae_dir), "--split", "all", "--identity", "--identity-faces", "6"]
    result = CliRunner().invoke(app, [*vae_eval, str(tiny_data)])  # colour blocks, not faces
    assert result.exit_code == 1 and "dlib found no face" in result.stderr
    write_dataset(tmp_path / "synth", 12, workers=1)
    result = CliRunner().invoke(app, [*vae_eval, str(tmp_path / "synth"), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["faces"] == 12 and report["identity_faces"] == 6 and report["identity_median"] > 0.05
    assert report["frechet"] > report["frechet_floor"] and "identity distance median" in result.stderr


def test_decoder_only_fine_tuning_keeps_the_latent_space(tmp_path, tiny_data, tiny_vae_dir):
    from facegen_cli.vae import vae_fingerprint

    with pytest.raises(FacegenError, match="--init"):
        VaeTrainConfig(steps=1, decoder_only=True)
    out = tmp_path / "decoder"
    train_vae(tiny_data, out, VaeTrainConfig(steps=2, batch_size=4, crop_size=64, learning_rate=1e-2, disc_start=0,
                                             init=str(tiny_vae_dir), decoder_only=True))
    before, after = load_vae(tiny_vae_dir), load_vae(out / "vae")
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    assert torch.equal(encode(before, images), encode(after, images))
    assert vae_fingerprint(before, encoder_only=True) == vae_fingerprint(after, encoder_only=True)
    assert vae_fingerprint(before) != vae_fingerprint(after)
    decoder = lambda vae: torch.cat([p.flatten() for p in vae.decoder.parameters()])  # noqa: E731
    assert not torch.equal(decoder(before), decoder(after))


def test_a_deepened_autoencoder_starts_as_exactly_the_old_one_and_then_learns(tmp_path, tiny_data, tiny_vae_dir):
    from facegen_cli.vae import decode, deepen_vae

    before = load_vae(tiny_vae_dir)
    deeper = deepen_vae(before, 3)
    assert deeper.config.layers_per_block == 3 and len(deeper.decoder.up_blocks[0].resnets) == 4
    assert sum(p.numel() for p in deeper.parameters()) > sum(p.numel() for p in before.parameters())
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    latents = encode(before, images)
    assert torch.allclose(encode(deeper, images), latents, atol=1e-5)  # the same function, other kernels' rounding
    assert torch.allclose(decode(deeper, latents), decode(before, latents), atol=1e-4)
    with pytest.raises(FacegenError, match="not made shallower"):
        deepen_vae(deeper, 2)
    with pytest.raises(FacegenError, match="without --decoder-only"):
        VaeTrainConfig(init=str(tiny_vae_dir), decoder_only=True, layers_per_block=2)
    out = tmp_path / "deeper"
    train_vae(tiny_data, out, VaeTrainConfig(steps=2, batch_size=4, crop_size=64, learning_rate=1e-2,
                                             init=str(tiny_vae_dir), layers_per_block=2))
    trained = load_vae(out / "vae")
    assert trained.config.layers_per_block == 2
    new_resnet = trained.encoder.down_blocks[0].resnets[1].conv2.weight
    assert new_resnet.abs().sum() > 0  # started at zero, trained


def test_export_swaps_in_a_decoder_with_the_same_encoder_only(tmp_path, tiny_data, tiny_vae_dir, tiny_model_dir):
    from typer.testing import CliRunner

    from facegen_cli.cli import app
    from facegen_cli.pipeline import FacegenPipeline
    from facegen_cli.vae import vae_fingerprint

    fine_tuned = tmp_path / "decoder"
    train_vae(tiny_data, fine_tuned, VaeTrainConfig(steps=1, batch_size=4, crop_size=64, learning_rate=1e-2,
                                                    init=str(tiny_vae_dir), decoder_only=True))
    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--vae", str(fine_tuned / "vae"),
                                      "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.stderr
    exported, expected = FacegenPipeline.load(tmp_path / "model"), load_vae(fine_tuned / "vae")
    assert all(torch.equal(a, b) for a, b in zip(exported.vae.state_dict().values(), expected.state_dict().values()))
    assert exported.info.decoder.fingerprint == vae_fingerprint(expected)  # named by its weights, not its path
    assert exported.info.decoder.name == "decoder/vae"

    stranger = load_vae(tiny_vae_dir).requires_grad_(False)
    with torch.no_grad():
        stranger.encoder.conv_in.weight.add_(0.1)
    stranger.save_pretrained(tmp_path / "stranger")
    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--vae", str(tmp_path / "stranger"),
                                      "--out", str(tmp_path / "refused")])
    assert result.exit_code != 0 and "encoder is not the model's" in result.stderr
    assert not (tmp_path / "refused").exists()


def test_the_discriminator_warms_up_without_touching_the_autoencoder(tmp_path, tiny_data, tiny_vae_dir):
    """During --disc-warmup the discriminator learns alone: the autoencoder's steps are those of a run
    without any discriminator."""
    common = dict(steps=2, batch_size=4, crop_size=64, learning_rate=1e-2, init=str(tiny_vae_dir), decoder_only=True)
    train_vae(tiny_data, tmp_path / "plain", VaeTrainConfig(**common))
    train_vae(tiny_data, tmp_path / "warming", VaeTrainConfig(disc_start=0, disc_warmup=2, **common))
    train_vae(tiny_data, tmp_path / "adversarial", VaeTrainConfig(disc_start=0, **common))
    plain, warming, adversarial = (load_vae(tmp_path / name / "vae").state_dict()
                                   for name in ("plain", "warming", "adversarial"))
    assert all(torch.equal(plain[k], warming[k]) for k in plain)
    assert not all(torch.equal(plain[k], adversarial[k]) for k in plain)


def test_feature_matching_is_zero_on_the_real_image_and_pulls_the_reconstruction_towards_it(tmp_path, tiny_data,
                                                                                           tiny_vae_dir):
    from facegen_cli.vae_train import PatchDiscriminator, feature_matching_loss

    torch.manual_seed(0)
    discriminator = PatchDiscriminator(channels=8)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert feature_matching_loss(discriminator, discriminator.features(x), x).item() == 0
    assert torch.equal(discriminator.features(x)[-1], discriminator(x))  # the logits last
    reconstruction = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    feature_matching_loss(discriminator, discriminator.features(reconstruction), x).backward()
    assert reconstruction.grad.abs().sum() > 0
    common = dict(steps=2, batch_size=4, crop_size=64, learning_rate=1e-2, init=str(tiny_vae_dir), decoder_only=True,
                  disc_start=0)
    train_vae(tiny_data, tmp_path / "adversarial", VaeTrainConfig(**common))
    train_vae(tiny_data, tmp_path / "matching", VaeTrainConfig(feature_weight=1.0, **common))
    adversarial, matching = (load_vae(tmp_path / name / "vae").state_dict() for name in ("adversarial", "matching"))
    assert not all(torch.equal(adversarial[k], matching[k]) for k in adversarial)
