"""A small attribute classifier: the measuring instrument of facegen's evaluation.

A CNN reads a face at 64x64 and predicts every attribute of a vocabulary (independent sigmoids).
Trained on a data set's labels (the built-in faces' exact ones, or CelebA's), it tells whether a
generated or edited face shows what was asked. Its held-out accuracy is saved beside it
(`accuracy.json`) and belongs beside every number that relies on it.
"""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import load_images_and_labels, read_dataset
from .devices import PRECISIONS
from .errors import FacegenError, first_line
from .files import atomic_dir, save_pretrained
from .images import to_tensor
from .runs import GeneratorState, TrainingRun

log = logging.getLogger(__name__)


def conv_block(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, stride=2), nn.BatchNorm2d(out_channels), nn.SiLU(),
    )


class AttributeClassifier(ModelMixin, ConfigMixin):
    """typical_logits: {"with": {attribute: logit}, "without": {...}}, how surely it reads held-out real faces
    labelled with and without each attribute (typical_logits()), like a VAE's scaling_factor a measurement
    kept in the config; None where not measured."""

    @register_to_config
    def __init__(self, attributes=(), image_size=64, widths=(16, 32, 64, 128), typical_logits=None):
        super().__init__()
        channels = [3, *widths]
        self.body = nn.Sequential(*[conv_block(a, b) for a, b in zip(channels, channels[1:])])
        self.head = nn.Linear(widths[-1], len(attributes))

    @property
    def attributes(self):
        return list(self.config.attributes)

    def features(self, images):
        """Images in [-1, 1] of any size -> pooled features (B, widths[-1])."""
        size = self.config.image_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images):
        """Logits (B, A): positive means the attribute is present."""
        return self.head(self.features(images))

    @torch.inference_mode()
    def embed(self, images, batch_size=256):
        """Pooled features (N, widths[-1]) of images in [-1, 1], batched: the space of diversity and
        Fréchet-distance measurements."""
        self.eval()
        return torch.cat([self.features(chunk.to(self.device)).cpu() for chunk in images.split(batch_size)])

    @torch.inference_mode()
    def read(self, images, batch_size=256):
        """(+1 / -1 per attribute (N, A), pooled features (N, D)) of images in [-1, 1], in one pass."""
        features = self.embed(images, batch_size)
        logits = self.head(features.to(self.device)).cpu()
        return torch.where(logits > 0, 1, -1), features

    def predict(self, images, batch_size=256):
        """+1 / -1 per attribute for images in [-1, 1]."""
        return self.read(images, batch_size)[0]

    @torch.inference_mode()
    def logits(self, images, batch_size=256):
        """Logits (N, A) of images in [-1, 1]: positive where the attribute is read."""
        return self.head(self.embed(images, batch_size).to(self.device)).cpu()


# typical_logits' quantile: a logit that this share of real faces labelled with an attribute read above it
# (and as many labelled without it below the "without" one): on 24 edited faces looked at, bangs and glasses
# were plainly there from about the logits that most real bangs and glasses read at, not from 0 up
TYPICAL_SHARE = 0.75


def typical_logits(model, images, labels, share=TYPICAL_SHARE):
    """{"with": {attribute: the logit that `share` of the faces labelled with it read above}, "without": {the
    logit that `share` of those labelled without it read below}} of `model` on images in [-1, 1] and labels
    (N, A) in {-1, 0, 1} of its attributes; an attribute no face is labelled with (or without) is left out."""
    logits = model.logits(images)
    typical = {"with": {}, "without": {}}
    for i, name in enumerate(model.attributes):
        for key, side, q in (("with", labels[:, i] > 0, 1 - share), ("without", labels[:, i] < 0, share)):
            if side.any():
                typical[key][name] = round(float(torch.quantile(logits[side, i], q)), 3)
    return typical


def accuracy(predictions, labels):
    """Per-attribute accuracy over the entries whose label is known (non-zero)."""
    known = labels != 0
    correct = (predictions == labels) & known
    return correct.sum(0).float() / known.sum(0).clamp(min=1)


def balanced_accuracy(predictions, labels):
    """Per-attribute mean of the accuracy on the positives and on the negatives (known labels only):
    0.5 for a reader that always says "no", whatever the attribute's frequency."""
    positives, negatives = labels > 0, labels < 0
    on_positives = ((predictions > 0) & positives).sum(0).float() / positives.sum(0).clamp(min=1)
    on_negatives = ((predictions < 0) & negatives).sum(0).float() / negatives.sum(0).clamp(min=1)
    return (on_positives + on_negatives) / 2


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """`facegen eval train-classifier`'s settings (the CLI's options replace these defaults)."""
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    image_size: int = 64  # the classifier reads faces at this side
    load_size: int = 128  # images are read at the models' resolution and reduced by the classifier itself
    widths: tuple = (16, 32, 64, 128)
    # weigh each attribute's positives by its negatives-to-positives ratio (CelebA's rare attributes would
    # otherwise be read as "no" almost always)
    balanced: bool = False
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self):
        if len(self.widths) != 4 or not all(isinstance(w, int) and w >= 1 for w in self.widths):
            raise FacegenError(f"--widths {','.join(map(str, self.widths))}: give four channel counts of at least "
                               "1, such as 32,64,128,256")
        if self.precision not in PRECISIONS:
            raise FacegenError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")


def fit_classifier(images, labels, attributes, config=ClassifierTrainConfig(), *, out=None, resume=False,
                   progress=None):
    """Train an AttributeClassifier on uint8 images (N, H, W, 3) and labels (N, A) in {-1, 0, 1}.

    Unknown labels (0) do not count in the loss. Horizontal flips augment (no attribute is sided). With a
    run folder `out`, each epoch ends with a checkpoint there, and `resume` continues from the last one.
    """
    run = TrainingRun(out, networks=("classifier",), states=("optimizer", "schedule", "generator"),
                      precision=config.precision, resume=resume)
    torch.manual_seed(config.seed)
    model = AttributeClassifier(attributes=list(attributes), image_size=config.image_size, widths=tuple(config.widths))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    per_epoch = math.ceil(len(images) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.epochs * per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    objects = {"classifier": model, "optimizer": optimizer, "schedule": schedule, "generator": GeneratorState(generator)}
    identity = {"attributes": list(attributes), "widths": list(config.widths), "seed": config.seed}
    start_epoch = run.restore(objects, identity)
    model = model.to(run.device)
    optimizer = objects["optimizer"] = run.accelerator.prepare(optimizer)
    positives = (labels > 0).sum(0).clamp(min=1)
    pos_weight = ((labels < 0).sum(0) / positives).float().clamp(min=1).to(run.device) if config.balanced else None
    task = progress.add_task("training classifier", total=config.epochs * per_epoch,
                             completed=start_epoch * per_epoch) if progress else None
    model.train()
    for epoch in range(start_epoch, config.epochs):
        for index in torch.randperm(len(images), generator=generator).split(config.batch_size):
            x = to_tensor(images[index.numpy()])
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(run.device)
            y = labels[index].to(run.device)
            known = (y != 0).float()
            with run.autocast():
                loss = (F.binary_cross_entropy_with_logits(model(x).float(), (y > 0).float(), reduction="none",
                                                           pos_weight=pos_weight) * known).sum() \
                    / known.sum().clamp(min=1)
            run.step(loss, optimizer)
            schedule.step()
            if progress:
                progress.advance(task)
        run.save(epoch + 1, objects, identity)
    return model.eval()


def held_out_split(model, data_dir, load_size=128):
    """(uint8 images, labels (N, A) in `model`'s attribute order) of the test split of a labelled folder (its
    vocabulary may be wider; attributes the model does not read are left out)."""
    images, labels, attributes = load_images_and_labels(data_dir, "test", load_size)
    missing = [a for a in model.attributes if a not in attributes]
    if missing:
        raise FacegenError(f"{data_dir} has no labels for {', '.join(missing)}")
    return images, labels[:, [attributes.index(a) for a in model.attributes]]


def scores(model, images, labels):
    """({attribute: accuracy}, {attribute: balanced accuracy}) of `model` on uint8 images and their labels."""
    predictions = model.predict(to_tensor(images))

    def by_attribute(values):
        return dict(zip(model.attributes, [round(v, 4) for v in values.tolist()]))

    return by_attribute(accuracy(predictions, labels)), by_attribute(balanced_accuracy(predictions, labels))


def held_out_accuracy(model, data_dir, load_size=128):
    """({attribute: accuracy}, number of faces, {attribute: balanced accuracy}) of `model` on the test split
    of a labelled folder (held_out_split)."""
    images, labels = held_out_split(model, data_dir, load_size)
    own, balanced = scores(model, images, labels)
    return own, len(images), balanced


def train_classifier(data_dir, out, config=ClassifierTrainConfig(), *, also_test=(), resume=False, progress=None):
    """Train on a data set's train split, measure on its test split and on the test splits of the folders
    `also_test`, save to `out`; returns ({data folder: {attribute: accuracy}}, its own first; its own
    balanced accuracy). Checkpoints go to OUT/checkpoints while it trains (`resume` continues them).
    """
    for folder in also_test:
        read_dataset(folder, "test")  # a wrong folder fails now, not after the training
    train_images, train_labels, attributes = load_images_and_labels(data_dir, "train", config.load_size)
    log.info(f"training an attribute classifier on {len(train_images)} faces")
    model = fit_classifier(train_images, train_labels, attributes, config, out=out, resume=resume, progress=progress)
    del train_images
    images, labels = held_out_split(model, data_dir, config.load_size)
    own, own_balanced = scores(model, images, labels)
    model.register_to_config(typical_logits=typical_logits(model, to_tensor(images), labels))
    others = {str(folder): held_out_accuracy(model, folder, config.load_size)[0] for folder in also_test}
    # the report names the data folders, not where they are on this machine
    named = {Path(folder).name: scores for folder, scores in others.items()}
    save_classifier(model, out, {"test_accuracy": own, "test_balanced_accuracy": own_balanced,
                                 "test_images": len(images), "train_images": len(train_labels),
                                 "data": Path(data_dir).name, "balanced_loss": config.balanced,
                                 "other_test_accuracy": named})
    return {str(data_dir): own, **others}, own_balanced


def save_classifier(model, out, report, dtype=None):
    with atomic_dir(out) as tmp:
        save_pretrained(model, tmp, dtype)
        (tmp / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)


def load_classifier(path, device="cpu"):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FacegenError(f"{path}: not an attribute classifier folder (no config.json)")
    try:
        model = AttributeClassifier.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise FacegenError(f"{path}: the classifier does not load: {first_line(e)}") from None
    report = json.loads((path / "accuracy.json").read_text()) if (path / "accuracy.json").is_file() else {}
    return model.to(device).eval(), report
