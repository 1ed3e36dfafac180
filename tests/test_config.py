"""Typed settings: sampler settings, a model folder's description, and how a command derives its own."""

import dataclasses
import json

import pytest
import torch

from facegen_cli.config import ModelInfo, SampleConfig
from facegen_cli.errors import FacegenError
from facegen_cli.pipeline import FacegenPipeline


def test_model_info_round_trips_through_its_json_and_ignores_keys_it_does_not_know():
    info = ModelInfo(preset="tiny", image_size=128, latent_mean=[0.0, 1.0], latent_std=[1.0, 2.0],
                     sample=SampleConfig(steps=7, method="heun", guidance=2.5), trained_steps=12)
    data = json.loads(json.dumps(info.to_dict()))
    assert list(data)[:3] == ["format", "version", "preset"] and "init_from" not in data  # unset keys stay out
    assert ModelInfo.from_dict(data, "m") == info
    assert ModelInfo.from_dict({**data, "written_by": "a later version"}, "m") == info


@pytest.mark.parametrize("change, message", [
    ({"latent_std": [1.0, 0.0]}, "std above 0"), ({"sample": {"method": "ddim"}}, "unknown sampler"),
    ({"sample": {"steps": 0}}, "at least 1"), ({"sample": {"guidance": float("nan")}}, "finite"),
    ({"sample": {"temperature": 1}}, "unknown keys"), ({"format": "something-else"}, "not a facegen model")])
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
