import pytest
import torch

from facegen_cli import flow
from facegen_cli.config import SampleConfig, load_preset
from facegen_cli.errors import FacegenError
from facegen_cli.model import LatentDiT
from test_model import perturbed


@pytest.fixture
def model():
    return perturbed(LatentDiT(attributes=[f"a{i}" for i in range(5)], **load_preset("tiny").model)).eval()


def test_interpolation_ends():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(2)), noise)


def test_logit_normal_times_are_inside_the_interval():
    t = flow.sample_timesteps(10_000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and t.std() < 0.25  # denser in the middle than uniform (0.289)


def test_laplacian_pyramid_reconstructs_and_loss_is_zero_on_equal_inputs():
    x = torch.randn(2, 4, 16, 16)
    bands = flow.laplacian_pyramid(x, 3)
    assert [b.shape[-1] for b in bands] == [16, 8, 4]
    rebuilt = bands[-1]
    for band in reversed(bands[:-1]):
        rebuilt = band + torch.nn.functional.interpolate(rebuilt, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(rebuilt, x, atol=1e-5)
    assert torch.equal(flow.laplacian_loss(x, x), torch.zeros(2))  # one value per example
    noisy = x.clone()
    noisy[1] += 0.1 * torch.randn_like(x[1])
    assert flow.laplacian_loss(x, noisy)[0] == 0 and flow.laplacian_loss(x, noisy)[1] > 0


def test_guidance_one_equals_the_conditional_prediction(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 5).sign()
    with torch.no_grad():
        assert torch.equal(flow.guided_velocity(model, x, t, y, 1.0), model(x, t, y))


def test_guidance_mixes_both_branches_of_one_batched_forward(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 5).sign()
    with torch.no_grad():
        v_c, v_u = model(x, t, y), model(x, t, torch.zeros_like(y))
        guided = flow.guided_velocity(model, x, t, y, 4.0)
    assert torch.allclose(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    assert not torch.allclose(guided, v_c, atol=1e-3)


def test_guidance_steers_away_from_a_given_reference_condition(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 5).sign()
    reference = y.clone()
    reference[:, 0] = -reference[:, 0]  # the same request with one attribute reversed
    with torch.no_grad():
        v_c, v_r = model(x, t, y), model(x, t, reference)
        guided = flow.guided_velocity(model, x, t, y, 4.0, reference)
        assert torch.equal(flow.guided_velocity(model, x, t, y, 1.0, reference), v_c)
        free = flow.guided_velocity(model, x, t, y, 4.0)
    assert torch.allclose(guided, v_r + 4.0 * (v_c - v_r), atol=1e-5)
    assert not torch.allclose(guided, free, atol=1e-3)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampling_is_reproducible_and_shaped(model, method):
    noise, y = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 5)
    a = flow.sample(model, noise, y, SampleConfig(steps=4, method=method))
    b = flow.sample(model, noise.clone(), y, SampleConfig(steps=4, method=method))
    assert a.shape == noise.shape and torch.equal(a, b)
    assert not torch.equal(a, noise)


def test_euler_on_a_constant_velocity_lands_exactly():
    # A model whose velocity is exact for the straight path from x0 = 0 returns x0 from pure noise.
    class Exact(torch.nn.Module):
        def forward(self, x, t, y):
            return x / t.view(-1, 1, 1, 1)  # v = noise - 0 = x_t / t

    noise = torch.randn(2, 4, 16, 16)
    for method in ("euler", "heun"):
        out = flow.sample(Exact(), noise, torch.zeros(2, 1), SampleConfig(steps=5, guidance=1.0, method=method))
        assert torch.allclose(out, torch.zeros_like(out), atol=1e-5)


def test_masked_sampling_keeps_the_known_latent_outside_the_mask(model):
    known, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:10, 3:12] = 1
    out = flow.sample(model, noise, torch.zeros(2, 5), SampleConfig(steps=6, guidance=2.0), known=known, mask=mask)
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], known[outside])
    assert not torch.allclose(out[~outside], known[~outside])


def test_partial_strength_starts_from_the_noised_known_latent(model):
    known, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    zero_steps_from = flow.sample(model, noise, torch.zeros(1, 5), SampleConfig(steps=3), start=0.0, known=known)
    assert torch.equal(zero_steps_from, known)  # strength 0 changes nothing
    with pytest.raises(ValueError):
        flow.sample(model, noise, torch.zeros(1, 5), SampleConfig(), start=0.5)


def test_unknown_sampler_is_refused():
    with pytest.raises(FacegenError, match="sampler"):
        SampleConfig(method="ddim")


def test_loss_falls_on_a_tiny_dataset(model):
    # Latents determined by their labels: the ideal velocity is learnable, so the loss can fall far.
    torch.manual_seed(0)
    y = torch.randn(8, 5).sign()
    patterns = torch.nn.functional.interpolate(torch.randn(5, 4, 4, 4), size=16, mode="bilinear")
    x0 = torch.einsum("ba,achw->bchw", y, patterns)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def evaluate():
        with torch.no_grad():
            return flow.flow_loss(model, x0, y, torch.Generator().manual_seed(123), laplacian_weight=0.1)[0].item()

    before = evaluate()
    model.train()
    for step in range(150):
        loss, parts = flow.flow_loss(model, x0, y, torch.Generator().manual_seed(step), laplacian_weight=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(parts) == {"mse", "laplacian"}
    assert evaluate() < 0.5 * before


def test_resampling_renoises_to_the_same_time_and_keeps_the_known_latent(model):
    """RePaint rounds go back from t_next to t with fresh noise; with an exact velocity field for
    x0 = 0 the result still lands on the data, and the known part is untouched either way."""
    class Exact(torch.nn.Module):
        def forward(self, x, t, y):
            return x / t.view(-1, 1, 1, 1)

    known, noise = torch.zeros(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    ones = torch.ones(2, 1, 16, 16)
    out = flow.sample(Exact(), noise, torch.zeros(2, 1), SampleConfig(steps=5, guidance=1.0), known=known, mask=ones,
                      resample=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, known, atol=1e-5)

    known = torch.randn(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 2:8, 2:8] = 1
    once = flow.sample(model, noise, torch.zeros(2, 5), SampleConfig(steps=4), known=known, mask=mask)
    thrice = flow.sample(model, noise, torch.zeros(2, 5), SampleConfig(steps=4), known=known, mask=mask, resample=3,
                         generator=torch.Generator().manual_seed(0))
    outside = (mask == 0).expand_as(once)
    assert torch.equal(thrice[outside], known[outside]) and not torch.equal(thrice, once)
