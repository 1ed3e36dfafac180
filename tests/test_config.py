"""Typed settings: sampler settings, a model folder's description, and how a command derives its own."""

import dataclasses
import json

import pytest
import torch

from facegen_cli.config import ModelInfo, Provenance, SampleConfig, load_preset
from facegen_cli.errors import FacegenError
from facegen_cli.pipeline import FacegenPipeline


def test_model_info_round_trips_through_its_json_and_ignores_keys_it_does_not_know():
    info = ModelInfo(preset="tiny", image_size=128, latent_mean=[0.0, 1.0], latent_std=[1.0, 2.0],
                     sample=SampleConfig(steps=7, method="heun", guidance=2.5), trained_steps=12,
                     vae=Provenance("vae-faces", "0123456789abcdef"))
    data = json.loads(json.dumps(info.to_dict()))
    assert list(data)[:3] == ["format", "version", "preset"] and "init_from" not in data  # unset keys stay out
    assert ModelInfo.from_dict(data, "m") == info
    assert ModelInfo.from_dict({**data, "written_by": "a later version"}, "m") == info


@pytest.mark.parametrize("change, message", [
    ({"latent_std": [1.0, 0.0]}, "std above 0"), ({"sample": {"method": "ddim"}}, "unknown sampler"),
    ({"sample": {"steps": 0}}, "at least 1"), ({"sample": {"guidance": float("nan")}}, "finite"),
    ({"sample": {"temperature": 1}}, "unknown keys"), ({"format": "something-else"}, "not a facegen model"),
    ({"image_size": -5}, "image_size must be"), ({"sample": {"guidance": 1e30}}, "out of range")])
def test_a_bad_model_description_is_refused_with_its_file_named(change, message):
    data = {**ModelInfo(image_size=64, latent_mean=[0.0, 0.0], latent_std=[1.0, 1.0]).to_dict(), **change}
    with pytest.raises(FacegenError, match=message) as error:
        ModelInfo.from_dict(data, "model/facegen.json")
    assert "model/facegen.json" in str(error.value)
    with pytest.raises(FacegenError, match="no 'image_size'"):
        ModelInfo.from_dict({"latent_mean": [0.0], "latent_std": [1.0]}, "m")


def test_a_command_overrides_only_what_it_is_given(tiny_model_dir):
    pipe = FacegenPipeline.load(tiny_model_dir)
    assert pipe.sample == SampleConfig(steps=10, method="euler", guidance=2.0)  # the tiny preset's [sample]
    assert pipe.settings() == pipe.sample
    assert pipe.settings(steps=3, guidance=None, method=None) == dataclasses.replace(pipe.sample, steps=3)
    # Guidance 1.0 given on the command line is kept (not mistaken for "not given").
    assert pipe.settings(guidance=1.0).guidance == 1.0
    # The model's own settings are what generate() uses when given none.
    assert torch.equal(pipe.generate(torch.zeros(12), [0]), pipe.generate(torch.zeros(12), [0], pipe.sample))


def test_provenance_is_a_name_and_a_fingerprint_never_a_path(tmp_path):
    (tmp_path / "runs/vae-faces/vae").mkdir(parents=True)
    assert Provenance.of(tmp_path / "runs/vae-faces/vae", "ab") == Provenance("vae-faces/vae", "ab")
    assert Provenance.of(tmp_path / "runs/vae-faces", "ab") == Provenance("vae-faces", "ab")
    assert Provenance.of("stabilityai/sd-vae-ft-mse", "cd").name == "stabilityai/sd-vae-ft-mse"  # a hub id
    # A version-1 facegen.json recorded paths: they are read as unknown provenance, not kept.
    data = {**ModelInfo(image_size=64, latent_mean=[0.0], latent_std=[1.0]).to_dict(), "version": 1,
            "vae_source": "/work/data/vae", "init_from": "/work/data/faces-34k"}
    info = ModelInfo.from_dict(data, "m")
    assert info.init_from is None and "/work" not in json.dumps(info.to_dict())


def test_no_shipped_model_folder_records_a_machine_path():
    from facegen_cli.pipeline import SHIPPED_MODELS

    for folder in SHIPPED_MODELS.values():
        for path in folder.rglob("*.json"):
            text = path.read_text()
            assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text, path


@pytest.mark.parametrize("model, message", [
    ("", "no [model] section"), ("[model]\nlatent_size = 16", "[model]: no 'latent_channels'"),
    ("[model]\nlatent_size = 16\nlatent_chanels = 4", "[model]: unknown keys ['latent_chanels']"),
    ("[model]\nlatent_size = 16\nlatent_channels = 4\npatch_size = 2\nhidden_size = 30\ndepth = 1\n"
     "num_heads = 4\nmlp_size = 8", "[model]: hidden_size 30 must divide by num_heads 4"),
    ("[model]\nlatent_size = 16\nlatent_channels = 4\npatch_size = 2\nhidden_size = 64\ndepth = 0\n"
     "num_heads = 4\nmlp_size = 8", "[model]: depth must be a whole number of at least 1")])
def test_a_bad_preset_shape_is_refused_in_one_line_naming_the_file_and_key(tmp_path, model, message):
    path = tmp_path / "mine.toml"
    path.write_text(f'description = "x"\n{model}\n')
    with pytest.raises(FacegenError) as error:
        load_preset(path)
    assert "preset mine" in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


def test_one_precision_vocabulary_everywhere():
    from facegen_cli.classifier import ClassifierTrainConfig
    from facegen_cli.devices import PRECISIONS, accelerate_precision, resolve_precision
    from facegen_cli.vae_train import VaeTrainConfig

    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    assert [accelerate_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    for make in (lambda p: load_preset("tiny").with_train(precision=p), lambda p: VaeTrainConfig(precision=p),
                 lambda p: ClassifierTrainConfig(precision=p)):
        make("bf16")
        with pytest.raises(FacegenError, match="unknown precision 'no'"):
            make("no")


def test_a_model_folder_whose_latent_statistics_do_not_fit_its_dit_is_refused(tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    data = json.loads((tmp_path / "m/facegen.json").read_text())
    data["latent_mean"], data["latent_std"] = data["latent_mean"][:3], data["latent_std"][:3]
    (tmp_path / "m/facegen.json").write_text(json.dumps(data))
    with pytest.raises(FacegenError, match="latent_mean has 3 values, but the DiT has 4"):
        FacegenPipeline.load(tmp_path / "m")


def test_the_guidance_interval_and_the_drawn_guidance_are_checked():
    from facegen_cli.config import SampleConfig

    assert SampleConfig(guidance_interval=[0.2, 0.8]).guidance_interval == (0.2, 0.8)
    for bad in ([0.8, 0.2], [0, 1.5], [0.5], "0.2,0.8"):
        with pytest.raises(FacegenError, match="guidance_interval"):
            SampleConfig(guidance_interval=bad)
    with pytest.raises(FacegenError, match="out of range"):
        SampleConfig(drawn_guidance=100)
