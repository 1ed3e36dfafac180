import dataclasses

import pytest
import torch

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.config import load_preset, preset_names
from facegen_cli.model import LatentDiT, sincos_pos_embed_2d


def build(name, device=None):
    with torch.device(device or "cpu"):
        return load_preset(name).model.build(DEFAULT_ATTRIBUTES)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_presets_include_the_design_sizes():
    assert {"tiny", "dit-s", "dit-b", "dit-l-face128"} <= set(preset_names())


def test_full_size_preset_matches_the_design():
    preset = load_preset("dit-l-face128")
    assert dataclasses.asdict(preset.model) == {"latent_size": 16, "latent_channels": 4, "patch_size": 2, "hidden_size": 1024,
                                 "depth": 15, "num_heads": 16, "mlp_size": 4096, "inpainting": False,
                                 "framing": False}
    model = build("dit-l-face128", device="meta")
    assert len(model.blocks) == 15
    assert model.grid_size**2 == 64  # patch 2 on 16x16 latents -> 64 tokens
    assert 286e6 < count(model) < 288e6


@pytest.mark.parametrize("name", ["tiny", "dit-s"])
def test_forward_shapes(name):
    model = build(name)
    x = torch.randn(2, 4, 16, 16)
    v = model(x, torch.rand(2), torch.zeros(2, 12))
    assert v.shape == x.shape


def test_every_preset_builds_on_meta_with_the_right_output_shape():
    for name in preset_names():
        model = build(name, device="meta")
        x = torch.empty(2, 4, 16, 16, device="meta")
        assert model(x, torch.empty(2, device="meta"), torch.empty(2, 12, device="meta")).shape == x.shape


def test_adaln_zero_initialisation_gives_zero_output():
    model = build("tiny")
    v = model(torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 12).sign())
    assert torch.equal(v, torch.zeros_like(v))


def test_blocks_start_as_identity():
    model = build("tiny")
    tokens, c = torch.randn(2, 64, 64), torch.randn(2, 64)
    assert torch.equal(model.blocks[0](tokens, c), tokens)


def perturbed(model, seed=0):
    """Move every weight off its initial value so that outputs depend on all of them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_output_depends_on_time_attributes_and_position():
    model = perturbed(build("tiny")).eval()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([0.5]), torch.zeros(1, 12)
    base = model(x, t, y)
    assert not torch.allclose(base, model(x, torch.tensor([0.9]), y))
    assert not torch.allclose(base, model(x, t, torch.eye(12)[:1]))
    # A permutation of the patches is not simply permuted back: the position embedding matters.
    shifted = model(torch.roll(x, 2, dims=-1), t, y)
    assert not torch.allclose(torch.roll(base, 2, dims=-1), shifted, atol=1e-4)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = perturbed(build("tiny")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LatentDiT.from_pretrained(tmp_path).eval()
    assert loaded.attributes == DEFAULT_ATTRIBUTES
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 12).sign()
    assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_vocabulary_lives_in_the_config(tmp_path):
    model = load_preset("tiny").model.build(["gray_hair", "goatee"])
    model.save_pretrained(tmp_path)
    assert LatentDiT.from_pretrained(tmp_path).attributes == ["gray_hair", "goatee"]


def test_position_embedding_is_fixed_and_distinct():
    emb = sincos_pos_embed_2d(64, 8)
    assert emb.shape == (64, 64)
    assert torch.unique(emb, dim=0).shape[0] == 64


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        LatentDiT(attributes=DEFAULT_ATTRIBUTES, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError):
        LatentDiT(attributes=DEFAULT_ATTRIBUTES, latent_size=15, patch_size=2)
