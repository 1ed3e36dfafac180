"""`facegen export`: a model folder copied for shipping, in float16 if asked, with its attribute classifier
and, where its encoder is the model's, another autoencoder's decoder."""

from pathlib import Path

import torch

from .classifier import load_classifier, save_classifier
from .pipeline import FacegenPipeline
from .vae import load_vae


def export_model(model, out, *, half=False, classifier=None, vae=None):
    """Write MODEL (a folder) to OUT: float16 weights with `half` (loading casts back to float32), the
    classifier `classifier` (default: the model folder's own, if any) in OUT/classifier, and the autoencoder
    `vae` instead of the model's (refused unless its encoder is the model's). Returns OUT."""
    dtype = torch.float16 if half else None
    pipe = FacegenPipeline.load(model)
    if vae is not None:
        pipe = pipe.with_vae(load_vae(vae), vae)
    classifier = classifier or pipe.classifier_path
    pipe.save(out, dtype)
    if classifier is not None:
        attribute_classifier, report = load_classifier(classifier)
        save_classifier(attribute_classifier.to(dtype) if half else attribute_classifier, Path(out) / "classifier",
                        report)
    return Path(out)
