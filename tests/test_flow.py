import pytest
import torch

from facegen_cli import flow, guidance, sampling
from facegen_cli.config import SampleConfig, load_preset
from facegen_cli.errors import FacegenError
from test_model import perturbed


@pytest.fixture
def model():
    return perturbed(load_preset("tiny").model.build([f"a{i}" for i in range(5)])).eval()


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
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(()), torch.randn(3, 5).sign()
    with torch.no_grad():
        assert torch.equal(guidance.classifier_free(model, y, torch.zeros_like(y), 1.0)(x, t), model(x, t.expand(3), y))


def test_guidance_mixes_both_branches_of_one_batched_forward(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(()).expand(3), torch.randn(3, 5).sign()
    with torch.no_grad():
        v_c, v_u = model(x, t, y), model(x, t, torch.zeros_like(y))
        guided = guidance.classifier_free(model, y, torch.zeros_like(y), 4.0)(x, t[0])
    assert torch.allclose(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    assert not torch.allclose(guided, v_c, atol=1e-3)


def test_guidance_steers_away_from_a_given_reference_condition(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(()).expand(3), torch.randn(3, 5).sign()
    reference = y.clone()
    reference[:, 0] = -reference[:, 0]  # the same request with one attribute reversed
    with torch.no_grad():
        v_c, v_r = model(x, t, y), model(x, t, reference)
        guided = guidance.classifier_free(model, y, reference, 4.0)(x, t[0])
        assert torch.equal(guidance.classifier_free(model, y, reference, 1.0)(x, t[0]), v_c)
        free = guidance.classifier_free(model, y, torch.zeros_like(y), 4.0)(x, t[0])
    assert torch.allclose(guided, v_r + 4.0 * (v_c - v_r), atol=1e-5)
    assert not torch.allclose(guided, free, atol=1e-3)


def test_guidance_interval_guides_inside_it_and_predicts_plainly_outside(model):
    x, y = torch.randn(3, 4, 16, 16), torch.randn(3, 5).sign()
    with torch.no_grad():
        for t, inside in ((0.5, True), (0.2, True), (0.9, False), (0.1, False)):
            t = torch.tensor(t)
            banded = guidance.classifier_free(model, y, torch.zeros_like(y), 4.0, interval=(0.2, 0.8))(x, t)
            expected = guidance.classifier_free(model, y, torch.zeros_like(y), 4.0 if inside else 1.0)(x, t)
            assert torch.allclose(banded, expected, atol=1e-6)


def test_composed_guidance_guides_the_drawn_attributes_and_the_asked_ones_apart(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor(0.5), torch.randn(3, 5).sign()
    drawn = y.clone()
    drawn[:, 0] = 0  # attribute 0 asked, the rest drawn
    free = torch.zeros_like(y)
    with torch.no_grad():
        v_c, v_p, v_r = (model(x, t.expand(3), c) for c in (y, drawn, free))
        composed = guidance.composed(model, y, drawn, free, 3.0, 1.5)(x, t)
        assert torch.allclose(composed, v_r + 1.5 * (v_p - v_r) + 3.0 * (v_c - v_p), atol=1e-5)
        # nothing asked: plain guidance towards the drawn attributes at their scale
        assert torch.allclose(guidance.composed(model, y, y, free, 3.0, 1.5)(x, t),
                              guidance.classifier_free(model, y, free, 1.5)(x, t), atol=1e-6)
        assert torch.allclose(guidance.composed(model, y, drawn, free, 3.0, 1.0)(x, t),
                              guidance.classifier_free(model, y, drawn, 3.0)(x, t), atol=1e-6)


def test_autoguidance_guides_away_from_the_weaker_model_and_the_asked_attributes_from_the_drawn(model):
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor(0.5), torch.randn(3, 5).sign()
    drawn = y.clone()
    drawn[:, 0] = 0
    guide = perturbed(load_preset("tiny").model.build([f"a{i}" for i in range(5)]), seed=1).eval()
    with torch.no_grad():
        v_c, v_p = (model(x, t.expand(3), c) for c in (y, drawn))
        g_p, g_c = (guide(x, t.expand(3), c) for c in (drawn, y))
        assert not torch.allclose(g_p, v_p)
        assert torch.allclose(guidance.autoguided(model, guide, y, drawn, 3.0, 2.0)(x, t),
                              g_p + 2.0 * (v_p - g_p) + 3.0 * (v_c - v_p), atol=1e-5)
        # nothing asked: autoguidance alone; weight 1 or the model as its own guide: the plain prediction
        assert torch.allclose(guidance.autoguided(model, guide, y, y, 3.0, 2.0)(x, t), g_c + 2.0 * (v_c - g_c),
                              atol=1e-5)
        for weaker, weight in ((guide, 1.0), (model, 2.0)):
            assert torch.allclose(guidance.autoguided(model, weaker, y, y, 3.0, weight)(x, t), v_c, atol=1e-5)


def velocity(model, y, scale=2.0):
    return guidance.classifier_free(model, y, torch.zeros_like(y), scale)


def masked(model, y, known, noise, mask, steps, start=1.0, resample=1, seeds=None, scale=2.0):
    """Masked sampling from the known latent noised to `start`, as the pipeline starts it."""
    times = sampling.time_grid(steps, start)
    path = sampling.noised_path(known, noise, times)
    generators = [torch.Generator().manual_seed(s) for s in (seeds or [0] * len(known))]
    with torch.inference_mode():
        return sampling.sample_masked(velocity(model, y, scale), path[0], times, known_path=path, mask=mask,
                                      generators=generators, resample=resample)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampling_is_reproducible_and_shaped(model, method):
    noise, y = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 5)
    with torch.inference_mode():
        a = sampling.sample(velocity(model, y), noise, sampling.time_grid(4), method=method)
        b = sampling.sample(velocity(model, y), noise.clone(), sampling.time_grid(4), method=method)
    assert a.shape == noise.shape and torch.equal(a, b)
    assert not torch.equal(a, noise)


def test_euler_on_a_constant_velocity_lands_exactly():
    # A model whose velocity is exact for the straight path from x0 = 0 returns x0 from pure noise.
    class Exact(torch.nn.Module):
        def forward(self, x, t, y):
            return x / t.view(-1, 1, 1, 1)  # v = noise - 0 = x_t / t

    noise = torch.randn(2, 4, 16, 16)
    for method in ("euler", "heun"):
        out = sampling.sample(velocity(Exact(), torch.zeros(2, 1), 1.0), noise, sampling.time_grid(5), method=method)
        assert torch.allclose(out, torch.zeros_like(out), atol=1e-5)


def test_masked_sampling_keeps_the_known_latent_outside_the_mask(model):
    known, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:10, 3:12] = 1
    out = masked(model, torch.zeros(2, 5), known, noise, mask, steps=6)
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], known[outside])
    assert not torch.allclose(out[~outside], known[~outside])


def test_partial_strength_starts_from_the_noised_known_latent(model):
    known, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    everywhere = torch.ones(1, 1, 16, 16)
    zero_steps_from = masked(model, torch.zeros(1, 5), known, noise, everywhere, steps=3, start=0.0)
    assert torch.equal(zero_steps_from, known)  # strength 0 changes nothing
    assert sampling.time_grid(4, 0.5)[0] == 0.5 and sampling.time_grid(4, 0.5)[-1] == 0


def test_unknown_sampler_is_refused():
    with pytest.raises(FacegenError, match="sampler"):
        SampleConfig(method="ddim")
    with pytest.raises(FacegenError, match="eta"):
        SampleConfig(method="stochastic", eta=1.5)


def test_the_stochastic_sampler_is_euler_without_fresh_noise_and_draws_each_items_own(model):
    noise, y = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.zeros(3, 5)
    times = sampling.time_grid(4)

    def stochastic(x, seeds, eta):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sampling.sample(velocity(model, y[:len(x)]), x, times, method="stochastic", generators=generators,
                               eta=eta)

    with torch.inference_mode():
        euler = sampling.sample(velocity(model, y), noise, times)
        assert torch.allclose(stochastic(noise, [0, 1, 2], 0.0), euler, atol=1e-5)
        together = stochastic(noise, [0, 1, 2], 0.6)
        assert (together - euler).abs().max() > 0.05  # fresh noise moves the path
        assert torch.equal(together, stochastic(noise, [0, 1, 2], 0.6))  # the seeds' own draws, again
        alone = stochastic(noise[1:2], [1], 0.6)
    assert torch.allclose(alone[0], together[1], atol=1e-5)  # an item's draws are its own, not the batch's


def test_an_ancestral_step_keeps_the_clean_part_the_velocity_implies():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, t_next = torch.tensor(0.6), torch.tensor(0.3)
    x = (1 - t) * x0 + t * eps
    exact = lambda z, time: eps - x0  # the straight path's own velocity
    fresh = torch.randn(2, 4, 8, 8)
    step = sampling.stochastic_step(exact, x, t, t_next, fresh, eta=0.8)
    assert torch.allclose(step, (1 - t_next) * x0 + t_next * (0.6 * eps + 0.8 * fresh), atol=1e-5)
    assert torch.allclose(sampling.stochastic_step(exact, x, t, torch.tensor(0.0), fresh, eta=0.8), x0, atol=1e-5)


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
    out = masked(Exact(), torch.zeros(2, 1), known, noise, ones, steps=5, resample=3, scale=1.0)
    assert torch.allclose(out, known, atol=1e-5)

    known = torch.randn(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 2:8, 2:8] = 1
    once = masked(model, torch.zeros(2, 5), known, noise, mask, steps=4)
    thrice = masked(model, torch.zeros(2, 5), known, noise, mask, steps=4, resample=3)
    outside = (mask == 0).expand_as(once)
    assert torch.equal(thrice[outside], known[outside]) and not torch.equal(thrice, once)


def test_resampling_draws_each_items_noise_from_its_own_generator(model):
    """An item's RePaint noise comes from its own seed: the same alone as beside any other item."""
    known, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    mask = torch.zeros(3, 1, 16, 16)
    mask[..., 3:11, 2:9] = 1
    y = torch.randn(3, 5).sign()
    together = masked(model, y, known, noise, mask, steps=3, resample=3, seeds=[4, 5, 6])
    for i, seed in enumerate([4, 5, 6]):
        alone = masked(model, y[i:i + 1], known[i:i + 1], noise[i:i + 1], mask[i:i + 1], steps=3, resample=3,
                       seeds=[seed])
        assert torch.allclose(alone[0], together[i], atol=1e-5)
    other = masked(model, y, known, noise, mask, steps=3, resample=3, seeds=[4, 9, 6])
    assert not torch.allclose(other[1], together[1], atol=1e-3)  # another seed, other draws


def test_inversion_runs_the_sampler_backwards_and_sampling_returns_to_the_start(model):
    """The ODE trajectory of a latent up to t = 0.6 and back down with the same velocity lands near where
    it began (Euler's error shrinks with the steps); the masked sampler on that path keeps the outside."""
    known = torch.randn(2, 4, 16, 16)
    y = torch.randn(2, 5).sign()
    v = guidance.conditional(model, y)
    errors = []
    with torch.inference_mode():
        for steps in (4, 32):
            times = sampling.time_grid(steps, 0.6)
            path = sampling.invert(v, known, times)
            assert len(path) == steps + 1 and torch.equal(path[-1], known)
            errors.append((sampling.sample(v, path[0], times) - known).abs().max().item())
        mask = torch.zeros(2, 1, 16, 16)
        mask[..., 4:12, 4:12] = 1
        out = sampling.sample_masked(v, path[0], times, known_path=path, mask=mask, generators=[None, None])
    assert errors[1] < errors[0] and errors[1] < 0.05
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], known[outside]) and (out - known).abs().max() < 0.05


def test_flow_edit_moves_only_where_the_conditions_differ_and_keeps_the_outside(model):
    """FlowEdit steps along v_target - v_source: with the same condition on both sides the source comes back
    unchanged (no inversion error to undo); with another it moves, only inside the mask, and an item's noise
    is its own generator's."""
    source = torch.randn(3, 4, 16, 16)
    y = torch.randn(3, 5).sign()
    times = sampling.time_grid(6, 0.8)
    generators = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    same = guidance.conditional(model, y)
    with torch.inference_mode():
        back = sampling.flow_edit(same, same, source, times, generators=generators([1, 2, 3]))
        assert torch.allclose(back, source, atol=1e-5)
        mask = torch.zeros(3, 1, 16, 16)
        mask[..., 3:11, 2:9] = 1
        target = guidance.classifier_free(model, -y, y, 3.0)
        edited = sampling.flow_edit(same, target, source, times, generators=generators([1, 2, 3]), mask=mask)
        outside = (mask == 0).expand_as(edited)
        assert torch.equal(edited[outside], source[outside]) and (edited - source).abs().max() > 1e-3
        one = slice(1, 2)
        alone = sampling.flow_edit(guidance.conditional(model, y[one]), guidance.classifier_free(model, -y[one], y[one], 3.0),
                                   source[one], times, generators=generators([2]), mask=mask[one])
        assert torch.allclose(alone[0], edited[1], atol=1e-5)


def test_rf_inversion_is_pulled_to_its_noise_going_up_and_to_the_source_coming_down(model):
    """RF-Inversion's two controllers: gamma 1 lands the inversion on the item's own noise draw at t = 1;
    eta 1 over every step brings any target velocity back onto the source; with neither, a constant field
    goes up and back exactly; outside the mask the source comes back, exactly."""
    source = torch.randn(3, 4, 16, 16)
    y = torch.randn(3, 5).sign()
    generators = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    still = lambda x, t: torch.zeros_like(x)  # noqa: E731
    constant = lambda x, t: torch.full_like(x, 0.3)  # noqa: E731
    times = sampling.time_grid(8)
    landed = sampling.rf_inversion(still, still, source, times, generators=generators([4, 5, 6]), gamma=1.0, eta=0.0)
    assert torch.allclose(landed, torch.stack([torch.randn(4, 16, 16, generator=g) for g in generators([4, 5, 6])]),
                          atol=1e-5)
    back = sampling.rf_inversion(constant, constant, source, sampling.time_grid(8, 0.7), generators=generators([1, 2, 3]),
                                 gamma=0.0, eta=0.0)
    assert torch.allclose(back, source, atol=1e-5)
    with torch.inference_mode():
        target = guidance.classifier_free(model, -y, y, 3.0)
        pulled = sampling.rf_inversion(guidance.conditional(model, y), target, source, sampling.time_grid(6, 0.8),
                                       generators=generators([1, 2, 3]), eta=1.0, eta_share=1.0)
        assert torch.allclose(pulled, source, atol=1e-5)
        mask = torch.zeros(3, 1, 16, 16)
        mask[..., 3:11, 2:9] = 1
        edited = sampling.rf_inversion(guidance.conditional(model, y), target, source, sampling.time_grid(6, 0.8),
                                       generators=generators([1, 2, 3]), mask=mask)
    outside = (mask == 0).expand_as(edited)
    assert torch.equal(edited[outside], source[outside]) and (edited - source).abs().max() > 1e-3
