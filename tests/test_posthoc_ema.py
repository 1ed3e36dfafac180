import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from facegen_cli.config import load_preset
from facegen_cli.errors import FacegenError
from facegen_cli.export import export_model
from facegen_cli.pipeline import FacegenPipeline
from facegen_cli.posthoc_ema import (PowerEMA, coefficients, exponent_of, profile_overlap, reconstruct,
                                     relative_std)
from facegen_cli.train import train


def profile_mean(exponent, last):
    """The mean step of the profile t^g on [0, last]: what an EMA of the weights w_t = t averages to."""
    return (exponent + 1) / (exponent + 2) * last


def test_exponents_match_the_paper_and_invert_the_width():
    # EDM2 (Karras et al. 2024) trains with relative widths 0.05 and 0.10: exponents 16.97 and 6.94
    assert exponent_of(0.05) == pytest.approx(16.97, abs=0.01)
    assert exponent_of(0.10) == pytest.approx(6.94, abs=0.01)
    for g in (0.5, 3.0, 20.0):
        assert exponent_of(relative_std(g)) == pytest.approx(g)
    with pytest.raises(FacegenError, match="out of range"):
        exponent_of(0.5)


def test_profile_overlap_is_the_integral_of_the_product():
    t = np.linspace(0, 1000, 2_000_001)
    p = lambda end, g: np.where(t <= end, (g + 1) * t ** g / end ** (g + 1), 0)  # noqa: E731
    for (a, ga), (b, gb) in [((600, 7.0), (1000, 17.0)), ((1000, 7.0), (400, 2.0)), ((800, 3.0), (800, 3.0))]:
        integral = np.trapezoid(p(a, ga) * p(b, gb), t)
        assert profile_overlap(a, ga, b, gb) == pytest.approx(integral, rel=1e-3)


def fill(ema, steps):
    """Step a one-parameter PowerEMA through weights w_t = t for t = 1..steps."""
    parameter = torch.zeros(1)
    for t in range(1, steps + 1):
        parameter.fill_(t)
        ema.step([parameter])


def test_power_ema_averages_the_weights_with_the_power_profile():
    ema = PowerEMA([("w", torch.zeros(1))])
    fill(ema, 4000)
    for exponent, average in zip(ema.exponents, ema.averages):
        assert average[0].item() == pytest.approx(profile_mean(exponent, 4000), rel=2e-3)
    # stepping on after a state_dict round trip gives what stepping straight on gives
    copy = PowerEMA([("w", torch.zeros(1))])
    copy.load_state_dict(ema.state_dict())
    fill(ema, 1), fill(copy, 1)
    assert [a[0].item() for a in ema.averages] == [a[0].item() for a in copy.averages]


def test_reconstruction_gives_other_widths_from_the_snapshots(tmp_path):
    ema = PowerEMA([("w", torch.zeros(1))])
    parameter = torch.zeros(1)
    for t in range(1, 2001):
        parameter.fill_(t / 2000)  # in [0, 1], where float16 snapshots are exact to 5e-4
        ema.step([parameter])
        if t % 250 == 0:
            ema.save_snapshot(tmp_path, t)
    for std in (0.05, 0.075, 0.10, 0.15):
        value = reconstruct(tmp_path, std)["w"].item()
        assert value == pytest.approx(profile_mean(exponent_of(std), 1), abs=3e-3), std
    # a stored width at the newest step is that snapshot itself
    weights = coefficients([1000, 2000, 2000], [exponent_of(0.05), exponent_of(0.05), exponent_of(0.1)], 2000,
                           exponent_of(0.05))
    assert weights == pytest.approx([0, 1, 0], abs=1e-6)
    assert reconstruct(tmp_path, 0.1, step=1000)["w"].item() == pytest.approx(profile_mean(exponent_of(0.1), 0.5),
                                                                             abs=3e-3)
    with pytest.raises(FacegenError, match="no snapshot at step 900"):
        reconstruct(tmp_path, 0.1, step=900)
    with pytest.raises(FacegenError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "none", 0.1)


def test_a_run_keeps_snapshots_resumes_them_bit_for_bit_and_exports_any_length(tmp_path, tiny_run):
    preset = load_preset("tiny")
    preset = preset.with_train(max_steps=8)
    preset.train.posthoc_ema_every = 2
    train(preset, tiny_run / "latents", tmp_path / "straight")
    short = preset.with_train(max_steps=4)
    train(short, tiny_run / "latents", tmp_path / "split")
    train(preset, tiny_run / "latents", tmp_path / "split", resume=True)
    names = sorted(p.name for p in (tmp_path / "straight/ema-snapshots").iterdir())
    assert names == [f"step-{s:06d}.safetensors" for s in (2, 4, 6, 8)]
    a = load_file(tmp_path / "straight/ema-snapshots/step-000008.safetensors")
    b = load_file(tmp_path / "split/ema-snapshots/step-000008.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = export_model(tmp_path / "straight/model", tmp_path / "exported", ema_length=0.1)
    pipe = FacegenPipeline.load(out)
    assert json.loads((out / "facegen.json").read_text())["ema_length"] == 0.1
    for name, p in pipe.dit.named_parameters():  # the stored 0.10 average, read back from float16
        torch.testing.assert_close(p, a[f"0.1/{name}"].float(), rtol=0, atol=1e-6)
    with pytest.raises(FacegenError, match="no post-hoc EMA snapshots"):
        export_model(tiny_run / "model", tmp_path / "other", ema_length=0.1)
