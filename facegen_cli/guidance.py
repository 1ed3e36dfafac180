"""Guidance: wrappers that turn a DiT and a request into the velocity function a sampler integrates.

Classifier-free guidance v = v_r + w (v_c - v_r) mixes the prediction for the condition c with that for a
reference condition r. The reference is the request's (attributes.AttributeRequest.reference): every
attribute free for a generated face; for an edit, the same face with the change reversed, so that guidance
pushes along the change alone. w = 1 is the plain conditional prediction.

A generated face whose free attributes were drawn from the label prior (label_prior.py) is guided in two
parts (composed): towards the drawn attributes gently, from the all-free reference, and towards the asked
ones at the full scale, from the drawn ones alone. Guiding the drawn ones at the full scale too makes every
face a caricature of its labels (on 200 faces, the classifier-feature Fréchet distance 2.8 at w = 1, 4.9
at 1.5, 10.0 at 3); not guiding them leaves more faces smeared.

Autoguidance (Karras et al. 2024) guides with a second, weaker model instead of a weaker condition:
v = v_guide(c) + w (v(c) - v_guide(c)), the guide a smaller model trained for less (MODEL/guide). Its errors
are the main model's, larger, so guiding away from them sharpens a face without pulling it towards its
labels. Where a model carries one, it takes the place of the drawn attributes' classifier-free step
(pipeline.FacegenPipeline._velocity); the asked attributes are still guided from the drawn ones.
"""

import torch


def conditional(model, y, inputs=None):
    """v(x, t) = model(x, t, y): no guidance. `inputs`: the model's other inputs, one row per item of the
    batch ({"context": model.inpainting_context, "framing": framing.features}, those it takes)."""
    inputs = inputs or {}

    def velocity(x, t):
        return model(x, t.expand(len(x)), y, **inputs).float()
    return velocity


def guided_chain(model, conditions, scales, inputs=None, interval=None, guide=None, guide_scale=1.0):
    """v = v_last + sum_k scales[k] (v_k - v_(k+1)) over `conditions` [c_0, ..., c_last] (each (B, A)), from
    the reference c_last towards c_0 one step of guidance at a time, all branches in one batched forward;
    with a `guide` model, v_last itself is autoguided: v_guide(c_last) + guide_scale (v_last - v_guide(c_last));
    every branch sees the same other `inputs` (conditional's), if any. With `interval` (lo, hi), guided only for
    lo <= t <= hi and the plain conditional prediction for c_0 elsewhere, at a fraction of the cost
    (Kynkäänniemi et al. 2024: guidance near the noise end pulls every face towards a few layouts, near the
    data end it adds nothing). The differences keep a branch equal to its neighbour exact: nothing to guide
    along gives v_last itself."""
    plain = conditional(model, conditions[0], inputs)
    n = len(conditions)
    branches = conditional(model, torch.cat(conditions), {k: torch.cat([v] * n) for k, v in (inputs or {}).items()})
    weaker = None if guide is None else conditional(guide, conditions[-1], inputs)

    def velocity(x, t):
        if interval is not None and not interval[0] <= float(t) <= interval[1]:
            return plain(x, t)
        # float() (in conditional): under bf16 autocast the guidance differences and the steps are still taken
        # in float32
        v = branches(torch.cat([x] * n), t).chunk(n)
        mixed = v[-1] if weaker is None else torch.lerp(weaker(x, t), v[-1], guide_scale)
        for k in reversed(range(n - 1)):
            mixed = mixed + scales[k] * (v[k] - v[k + 1])
        return mixed
    return velocity


def classifier_free(model, y, reference, scale, inputs=None, interval=None):
    """v(x, t) = v_r + scale (v_c - v_r), both branches in one batched forward; `y`, `reference`: (B, A);
    both branches see the same other `inputs` (conditional's), if any; `interval`: guided_chain's."""
    if scale == 1.0:
        return conditional(model, y, inputs)
    return guided_chain(model, [y, reference], [scale], inputs, interval)


def composed(model, y, partial, reference, scale, partial_scale, interval=None):
    """v = v_r + partial_scale (v_p - v_r) + scale (v_c - v_p): guided at `scale` from `partial` (the
    condition without the asked attributes: what was drawn for the face) to `y`, and at `partial_scale` from
    `reference` to `partial`; all (B, A), one batched forward. Where nothing is asked (partial == y) it is
    classifier_free at partial_scale, two branches; with partial_scale 1, classifier_free from `partial`."""
    if torch.equal(partial, y):
        return classifier_free(model, y, reference, partial_scale, interval=interval)
    if partial_scale == 1.0:
        return classifier_free(model, y, partial, scale, interval=interval)
    return guided_chain(model, [y, partial, reference], [scale, partial_scale], interval=interval)


def autoguided(model, guide, y, partial, scale, guide_scale, interval=None):
    """v = v_g(p) + guide_scale (v_p - v_g(p)) + scale (v_c - v_p): the drawn attributes `partial` autoguided
    by the weaker model `guide`, the asked ones `y` guided from them at `scale` (composed's second step).
    Where nothing is asked (partial == y) it is autoguidance alone, one branch of each model."""
    if torch.equal(partial, y):
        return guided_chain(model, [y], [], interval=interval, guide=guide, guide_scale=guide_scale)
    return guided_chain(model, [y, partial], [scale], interval=interval, guide=guide, guide_scale=guide_scale)


def distilled(model, y, drawn, scale, drawn_scale, step):
    """v(x, t) in one call of a distilled model: composed's v_r + drawn_scale (v_drawn - v_r) + scale (v_c -
    v_drawn) from the all-free reference, averaged over a step of size `step` (0: the velocity itself). `y`
    (B, A) the condition; `drawn` (B, A) its attributes drawn from the label prior (the asked ones free), or
    None where everything not free was asked (classifier_free at `scale`)."""
    asked = y != 0 if drawn is None else (y != 0) & (drawn == 0)
    scales = torch.tensor([float(scale), float(drawn_scale)], device=y.device).expand(len(y), 2)

    def velocity(x, t):
        return model(x, t.expand(len(x)), y, guidance=(scales, asked), step=y.new_full((len(x),), step)).float()
    return velocity
