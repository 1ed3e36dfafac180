"""Rectified flow: the training objective and the samplers.

A clean latent x0 and Gaussian noise eps are joined by a straight line

    x_t = (1 - t) * x0 + t * eps,        t in [0, 1],

whose velocity v = dx_t/dt = eps - x0 is what the model learns. Sampling integrates
dx/dt = v from t = 1 (pure noise) to t = 0 with Euler or Heun steps. The same loop serves
inpainting: where a mask is 0 the known latent, re-noised to the current time, is put back
after every step, so only the masked region is generated.
"""

import torch
import torch.nn.functional as F


def interpolate(x0, noise, t):
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def sample_timesteps(n, generator, mean=0.0, std=1.0, device="cpu"):
    """Logit-normal times (Esser et al. 2024): sigmoid of N(mean, std), denser in the middle."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def laplacian_pyramid(x, levels):
    """Band-pass images of x at `levels` scales; the last entry is the low-pass residual."""
    bands = []
    for _ in range(levels - 1):
        down = F.avg_pool2d(x, 2)
        bands.append(x - F.interpolate(down, scale_factor=2, mode="bilinear", align_corners=False))
        x = down
    return bands + [x]


def per_example_mean(x):
    return x.flatten(1).mean(1)


def laplacian_loss(prediction, target, levels=3):
    """Per example, the mean L1 distance between the Laplacian pyramids: weighs edges and fine detail."""
    pairs = zip(laplacian_pyramid(prediction, levels), laplacian_pyramid(target, levels))
    return sum(per_example_mean((p - t).abs()) for p, t in pairs) / levels


def flow_loss(model, x0, y, generator, laplacian_weight=0.0, t_mean=0.0, t_std=1.0, weights=None):
    """MSE on the velocity plus `laplacian_weight` times a Laplacian-pyramid L1 on the implied x0,
    averaged over the batch with the per-example `weights` (all 1 when not given).

    Returns (loss, {"mse": ..., "laplacian": ...}) with the parts detached for logging.
    """
    noise = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
    t = sample_timesteps(x0.shape[0], generator, t_mean, t_std, x0.device)
    x_t = interpolate(x0, noise, t)
    v_pred = model(x_t, t, y).float()
    weights = torch.ones(x0.shape[0], device=x0.device) if weights is None else weights.float()
    batch_mean = lambda per_example: (weights * per_example).sum() / weights.sum()  # noqa: E731
    mse = batch_mean(per_example_mean((v_pred - (noise - x0).float()) ** 2))
    loss, parts = mse, {"mse": mse.detach()}
    if laplacian_weight > 0:
        x0_pred = x_t.float() - t.view(-1, 1, 1, 1) * v_pred
        lap = batch_mean(laplacian_loss(x0_pred, x0.float()))
        loss = loss + laplacian_weight * lap
        parts["laplacian"] = lap.detach()
    return loss, parts


def guided_velocity(model, x, t, y, guidance, reference=None):
    """Classifier-free guidance v_r + w (v_c - v_r), both branches in one batched forward.

    The reference branch r is y = 0 (every attribute free), the null condition that training drops
    to, unless `reference` (B, A) gives another: an edit guides away from the same request with the
    edited attributes reversed (a negative condition), so that guidance pushes along the change
    asked for and not towards everything the request holds. w = 1 is the plain conditional prediction.
    """
    if guidance == 1.0:
        return model(x, t, y).float()
    reference = torch.zeros_like(y) if reference is None else reference
    # float(): under bf16 autocast the guidance difference and the steps are still taken in float32
    v_c, v_r = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, reference])).float().chunk(2)
    return v_r + guidance * (v_c - v_r)


@torch.inference_mode()
def sample(model, noise, y, settings, start=1.0, known=None, mask=None, resample=1, generator=None,
           reference=None):
    """Integrate from t = `start` to t = 0 and return the clean latent.

    noise:  (B, C, H, W) Gaussian noise; it fixes the result (a seed makes sampling reproducible).
    y:      (B, A) attribute requests.
    settings: a config.SampleConfig: the number of steps, euler or heun, the guidance scale.
    start:  1.0 generates from pure noise; s < 1 starts from `known` noised to t = s (img2img).
    known:  (B, C, H, W) clean latent to keep (required when start < 1 or a mask is given).
    mask:   (B, 1 or C, H, W) in [0, 1]; 1 = generate, 0 = keep `known`. The known part is
            re-noised to each new time, x_t = (1 - t) known + t noise, as flow inpainting does.
    resample: RePaint's resampling with a mask: each step is taken `resample` times, going back
            from t_next to t with fresh noise (from `generator`) in between, so that the generated
            region settles against the known one.
    reference: (B, A) the guidance's reference condition (default: every attribute free).
    """
    steps, guidance, method = settings.steps, settings.guidance, settings.method
    if (mask is not None or start < 1.0) and known is None:
        raise ValueError("a mask or start < 1 needs the known latent")
    times = torch.linspace(start, 0.0, steps + 1, device=noise.device)
    x = noise if known is None else interpolate(known, noise, times[:1].expand(noise.shape[0]))
    for t, t_next in zip(times[:-1], times[1:]):
        for round_ in range(resample if mask is not None else 1):
            if round_ > 0:  # back from t_next to t: x_t = a x_next + b eps keeps the noise level t
                a = (1 - t) / (1 - t_next)
                x = a * x + (t.square() - (a * t_next).square()).clamp(min=0).sqrt() * torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype)
            v = guided_velocity(model, x, t.expand(x.shape[0]), y, guidance, reference)
            x_next = x + (t_next - t) * v
            if method == "heun" and t_next > 0:
                v_next = guided_velocity(model, x_next, t_next.expand(x.shape[0]), y, guidance, reference)
                x_next = x + (t_next - t) * (v + v_next) / 2
            if mask is not None:
                x_next = mask * x_next + (1 - mask) * interpolate(known, noise, t_next.expand(x.shape[0]))
            x = x_next
    return x
