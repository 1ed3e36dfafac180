"""Samplers for the rectified-flow ODE dx/dt = v(x, t), integrated from t = 1 (noise) towards t = 0.

Every sampler has one signature, as in k-diffusion:

    sampler(velocity, x, times, *, callback=None, ...) -> x at times[-1]

`velocity(x, t)` is the model as a function of the latent and a scalar time (guidance.py wraps a DiT and
a request into one); `times` is the decreasing grid (time_grid); `callback(i, x)` sees the latent after
step i. A sampler never draws from a shared random stream: the masked one takes one generator per item,
so that an item comes out the same alone or in any batch.
"""

import torch

from .flow import interpolate


def time_grid(steps, start=1.0, device="cpu"):
    """`steps` equal steps from t = start down to 0 (steps + 1 times)."""
    return torch.linspace(start, 0.0, steps + 1, device=device)


def euler_step(velocity, x, t, t_next):
    return x + (t_next - t) * velocity(x, t)


def heun_step(velocity, x, t, t_next):
    """Heun's second-order step (the trapezoid rule); the last step, to t = 0, is Euler's."""
    v = velocity(x, t)
    x_next = x + (t_next - t) * v
    if t_next > 0:
        x_next = x + (t_next - t) * (v + velocity(x_next, t_next)) / 2
    return x_next


STEPS = {"euler": euler_step, "heun": heun_step}


def sample(velocity, x, times, *, method="euler", generators=None, eta=0.0, callback=None):
    """Integrate from times[0] to times[-1] with the `method`'s steps: euler, heun, or stochastic
    (stochastic_step: each item's fresh noise from its own `generators`, a share `eta` of the noise)."""
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        if method == "stochastic":
            x = stochastic_step(velocity, x, t, t_next, per_item_noise(generators, x), eta)
        else:
            x = STEPS[method](velocity, x, t, t_next)
        if callback:
            callback(i, x)
    return x


def stochastic_step(velocity, x, t, t_next, noise, eta):
    """An ancestral step of the flow (DDIM's eta): the velocity splits x_t = (1 - t) x0 + t eps into its
    clean part x0 = x - t v and its noise eps = x + (1 - t) v, and the next latent is x0 noised to t_next
    again with eps of which a share eta (in variance, eta^2) is replaced by fresh `noise`. eta = 0 is
    Euler's step (up to rounding); a step to t = 0 lands on x0."""
    v = velocity(x, t)
    clean, eps = x - t * v, x + (1 - t) * v
    renewed = (1 - eta ** 2) ** 0.5 * eps + eta * noise
    return (1 - t_next) * clean + t_next * renewed


def per_item_noise(generators, like):
    """One standard normal draw shaped like one item of `like` from each item's own generator (drawn on the
    generator's device)."""
    return torch.stack([torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype)
                        for g in generators]).to(like.device)


def sample_masked(velocity, x, times, *, known_path, mask, generators, resample=1, method="euler",
                  callback=None):
    """Inpainting: only where `mask` is 1 is generated; elsewhere the known latent at each new time,
    known_path[i] at times[i], is put back after every step. With the known latent noised by fresh noise
    (x_t = (1 - t) known + t noise, as flow inpainting does) that path is RePaint's; with the known latent's
    own ODE trajectory (invert) it is the photo's own.

    resample: RePaint's rounds per step. Each round after the first goes back from t_next to t with fresh
    noise from the item's generator (x_t = a x_next + b eps keeps the noise level t), so that the generated
    region settles against the known one.
    """
    step = STEPS[method]
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        for round_ in range(resample):
            if round_ > 0:
                a = (1 - t) / (1 - t_next)
                x = a * x + (t.square() - (a * t_next).square()).clamp(min=0).sqrt() * per_item_noise(generators, x)
            x = mask * step(velocity, x, t, t_next) + (1 - mask) * known_path[i + 1]
        if callback:
            callback(i, x)
    return x


def noised_path(known, noise, times):
    """The known latent noised to each time with one draw of noise: x_t = (1 - t) known + t noise."""
    return [interpolate(known, noise, t.expand(len(known))) for t in times]


def invert(velocity, x0, times, *, method="euler"):
    """The ODE trajectory from clean latents x0 up to noise at times[0] (the grid a sampler then integrates
    down): the same integrator run backwards. Returns the latents at each of `times` (x0 last)."""
    path = [x0]
    sample(velocity, x0, times.flip(0), method=method, callback=lambda i, x: path.append(x))
    return path[::-1]


def flow_edit(source_velocity, target_velocity, x, times, *, generators, mask=None, callback=None):
    """FlowEdit (Kulikov et al. 2024): an edit as the ODE between the source and the target condition,
    without inversion. At each time the source is noised with fresh noise from each item's generator,
    x_src_t = (1 - t) x + t eps, the edited latent is moved by as much as the source was, and the edit steps
    along the difference of the two velocities, target_velocity(z + x_src_t - x) - source_velocity(x_src_t),
    so that where the two conditions agree nothing moves. `x`: the source's clean latents; `mask`: where the
    edit may change them (elsewhere they stay the source's)."""
    source, z = x, x
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        noised = interpolate(source, per_item_noise(generators, source), t.expand(len(source)))
        z = z + (t_next - t) * (target_velocity(z + noised - source, t) - source_velocity(noised, t))
        if mask is not None:
            z = mask * z + (1 - mask) * source
        if callback:
            callback(i, z)
    return z


def rf_inversion(source_velocity, target_velocity, x, times, *, generators, gamma=0.5, eta=0.9, eta_share=0.25,
                 mask=None, callback=None):
    """RF-Inversion (Rout et al. 2024): the source latents `x` taken up to times[0] by an ODE drawn towards
    one draw of noise eps per item (from its generator) with strength `gamma`,
    v = v_src + gamma ((eps - y) / (1 - t) - v_src), and brought down by the target velocity drawn back
    towards the source with strength `eta` over the first `eta_share` of the steps (the noisy ones, where a
    face's layout is decided), v = v_tgt + eta ((z - x) / t - v_tgt), freely after that. `mask`: where the
    edit may change the latents; elsewhere they follow the inversion's own path back to `x`, exactly."""
    noise, rising = per_item_noise(generators, x), times.flip(0)
    path, y = [x], x
    for t, t_next in zip(rising[:-1], rising[1:]):
        v = source_velocity(y, t)
        y = y + (t_next - t) * torch.lerp(v, (noise - y) / (1 - t), gamma)
        path.append(y)
    path, z = path[::-1], y
    pulled = round(eta_share * (len(times) - 1))
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = target_velocity(z, t)
        z = z + (t_next - t) * (torch.lerp(v, (z - x) / t, eta) if i < pulled else v)
        if mask is not None:
            z = mask * z + (1 - mask) * path[i + 1]
        if callback:
            callback(i, z)
    return z
