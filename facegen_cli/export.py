"""`facegen export`: a model folder copied for shipping, in float16 if asked, with its attribute classifier
and, where its encoder is the model's, another autoencoder's decoder."""

import dataclasses
from pathlib import Path

import torch

from .classifier import load_classifier, save_classifier
from .errors import FacegenError
from .files import atomic_dir, check_replaceable_folder
from .label_prior import prior_of_data
from .pipeline import MODEL_FILE, FacegenPipeline, model_path
from .posthoc_ema import SNAPSHOT_DIR, reconstruct
from .vae import load_vae


def check_export_target(source, out, overwrite):
    """Refuse an OUT that export would destroy: the model itself, a folder holding anything but a facegen
    model, or a model folder without `overwrite`."""
    if out.exists() and out.resolve() == source.resolve():
        raise FacegenError(f"{out} is the model being exported; export into another folder")
    check_replaceable_folder(out, MODEL_FILE, "a facegen model", overwrite)


def with_posthoc_ema(pipe, snapshots, ema_length):
    """`pipe` with its DiT's weights replaced by the post-hoc EMA of relative width `ema_length`,
    reconstructed from the training run's snapshots (default: the run folder's, beside RUN/model)."""
    snapshots = Path(snapshots) if snapshots else Path(pipe.path).resolve().parent / SNAPSHOT_DIR
    weights = reconstruct(snapshots, ema_length)
    expected = dict(pipe.dit.named_parameters())
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise FacegenError(f"{snapshots}: the snapshots are of another model than {pipe.path}'s DiT")
    dit = type(pipe.dit).from_config(pipe.dit.config)
    dit.load_state_dict({**pipe.dit.state_dict(), **weights})
    info = dataclasses.replace(pipe.info, ema_length=ema_length)
    return pipe.replaced(dit=dit.eval().requires_grad_(False), info=info)


def export_model(model, out, *, half=False, classifier=None, vae=None, labels=None, ema_length=None, snapshots=None,
                 guide=None, autoguidance=None, overwrite=False):
    """Write MODEL (a folder or a shipped model's name) to OUT, all at once or not at all: float16 weights
    with `half` (loading casts back to float32), the classifier `classifier` (default: the model folder's
    own, if any) in OUT/classifier, the autoencoder `vae` instead of the model's (refused unless its
    encoder is the model's), and the label prior of the labelled folder `labels` (its train split) instead
    of the model's, and its DiT's weights as the post-hoc EMA of relative width `ema_length` from the
    training run's `snapshots` (with_posthoc_ema); the model folder `guide`'s DiT as the autoguidance guide
    (OUT/guide), used at weight `autoguidance`. OUT must be new or empty, or a model folder with `overwrite`. Returns OUT."""
    out = Path(out)
    check_export_target(model_path(model), out, overwrite)
    dtype = torch.float16 if half else None
    pipe = FacegenPipeline.load(model)
    if vae is not None:
        pipe = pipe.with_vae(load_vae(vae), vae)
    if ema_length is not None:
        pipe = with_posthoc_ema(pipe, snapshots, ema_length)
    if guide is not None:
        if autoguidance is None:
            raise FacegenError("--guide needs --autoguidance, the weight it guides with (e.g. 2)")
        pipe = pipe.with_guide(FacegenPipeline.load(guide), autoguidance)
    elif autoguidance is not None:
        if pipe.guide is None:
            raise FacegenError(f"{model} carries no guide; give one with --guide")
        pipe = pipe.replaced(info=dataclasses.replace(pipe.info, sample=pipe.settings(autoguidance=autoguidance)))
    if labels is not None:
        pipe = pipe.with_prior(prior_of_data(labels, pipe.attributes))
    classifier_path = classifier or pipe.classifier_path
    attribute_classifier, report = load_classifier(classifier_path) if classifier_path else (None, None)
    with atomic_dir(out) as tmp:
        pipe.write(tmp, dtype)
        if attribute_classifier is not None:
            save_classifier(attribute_classifier, tmp / "classifier", report, dtype)
    return out
