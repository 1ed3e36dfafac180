"""Guidance: wrappers that turn a DiT and a request into the velocity function a sampler integrates.

Classifier-free guidance v = v_r + w (v_c - v_r) mixes the prediction for the condition c with that for a
reference condition r. The reference is the request's (attributes.AttributeRequest.reference): every
attribute free for a generated face; for an edit, the same face with the change reversed, so that guidance
pushes along the change alone. w = 1 is the plain conditional prediction.
"""

import torch


def conditional(model, y):
    """v(x, t) = model(x, t, y): no guidance."""
    def velocity(x, t):
        return model(x, t.expand(len(x)), y).float()
    return velocity


def classifier_free(model, y, reference, scale):
    """v(x, t) = v_r + scale (v_c - v_r), both branches in one batched forward; `y`, `reference`: (B, A)."""
    if scale == 1.0:
        return conditional(model, y)

    def velocity(x, t):
        t = t.expand(len(x))
        # float(): under bf16 autocast the guidance difference and the steps are still taken in float32
        v_c, v_r = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, reference])).float().chunk(2)
        return v_r + scale * (v_c - v_r)
    return velocity
