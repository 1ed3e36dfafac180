"""Rectified flow: the training objective.

A clean latent x0 and Gaussian noise eps are joined by a straight line

    x_t = (1 - t) * x0 + t * eps,        t in [0, 1],

whose velocity v = dx_t/dt = eps - x0 is what the model learns. Sampling integrates dx/dt = v from
t = 1 (pure noise) to t = 0 (sampling.py).
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


def flow_loss(model, x0, y, generator, laplacian_weight=0.0, t_mean=0.0, t_std=1.0, weights=None, inputs=None):
    """MSE on the velocity plus `laplacian_weight` times a Laplacian-pyramid L1 on the implied x0,
    averaged over the batch with the per-example `weights` (all 1 when not given); `inputs`: the model's
    other inputs, per example (guidance.conditional's).

    Returns (loss, {"mse": ..., "laplacian": ...}) with the parts detached for logging.
    """
    noise = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
    t = sample_timesteps(x0.shape[0], generator, t_mean, t_std, x0.device)
    x_t = interpolate(x0, noise, t)
    v_pred = model(x_t, t, y, **(inputs or {})).float()
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
