"""Guidance: wrappers that turn a DiT and a request into the velocity function a sampler integrates.

Classifier-free guidance v = v_r + w (v_c - v_r) mixes the prediction for the condition c with that for a
reference condition r. The reference is the request's (attributes.AttributeRequest.reference): every
attribute free for a generated face; for an edit, the same face with the change reversed, so that guidance
pushes along the change alone. w = 1 is the plain conditional prediction.
"""

import torch


def conditional(model, y, context=None):
    """v(x, t) = model(x, t, y): no guidance. `context`: an inpainting model's (model.inpainting_context)."""
    def velocity(x, t):
        t = t.expand(len(x))
        return (model(x, t, y) if context is None else model(x, t, y, context)).float()
    return velocity


def classifier_free(model, y, reference, scale, context=None, interval=None):
    """v(x, t) = v_r + scale (v_c - v_r), both branches in one batched forward; `y`, `reference`: (B, A);
    both branches see the same inpainting `context`, if any. With `interval` (lo, hi), guided only for
    lo <= t <= hi and plain conditional elsewhere, at half the cost (Kynkäänniemi et al. 2024: guidance near
    the noise end pulls every face towards a few layouts, near the data end it adds nothing)."""
    plain = conditional(model, y, context)
    if scale == 1.0:
        return plain
    both = conditional(model, torch.cat([y, reference]), None if context is None else torch.cat([context, context]))

    def velocity(x, t):
        if interval is not None and not interval[0] <= float(t) <= interval[1]:
            return plain(x, t)
        # float() (in conditional): under bf16 autocast the guidance difference and the steps are still taken
        # in float32
        v_c, v_r = both(torch.cat([x, x]), t).chunk(2)
        return v_r + scale * (v_c - v_r)
    return velocity
