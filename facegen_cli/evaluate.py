"""Measuring a model with the attribute classifier: control and leakage (disentanglement).

Every attribute is asked for alone, +1 and -1, with the same seeds. Then
  control[i, s]  = fraction of faces asked for attribute i with sign s that the classifier reads so;
  leakage[i, j]  = fraction of seeds whose reading of attribute j differs between +i and -i.
The diagonal of `leakage` is the flip rate of the attribute itself (high is good); off the
diagonal, any change is leakage (low is good). There the other attributes are free, so the data's
own correlations (beards on men) move them too; `free_flip_ceiling` says how far.

The flip with the others held takes each face asked -i (or +i), reads all its attributes, and asks
for exactly those readings with i flipped, same seed: the same face with one attribute changed,
which is what `facegen edit` does to a photo. It is guided from the held readings to the flip, as
`facegen generate` guides the asked attributes from those it drew (guidance.composed): guided from the
all-free reference instead, the push spreads over every held attribute and the flip itself is lost (on
16 faces, a beard taken away 19% of the time instead of 94%). Where the model carries a label prior,
the flips are also counted over the faces whose held readings the training data supports beside the
flip: a beard added to a face read as a woman's has almost no training faces behind it. The
classifier's own held-out accuracy bounds all these numbers and is reported beside them.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .attributes import EXCLUSIVE, describe, exclusive_pairs, hold_readings
from .data import load_images_and_labels, read_dataset
from .errors import FacegenError, first_line
from .files import atomic_path, save_figure, save_image, write_json
from .images import image_grid, to_tensor, to_uint8
from .layout import read_landmarks

SIGNS = (1, -1)


def single_attribute_requests(num_attributes):
    """Requests (2A, A): +e_0, -e_0, +e_1, -e_1, ... (each attribute alone, for and against)."""
    eye = torch.eye(num_attributes)
    return torch.stack([sign * eye[i] for i in range(num_attributes) for sign in SIGNS])


def read_single_attribute_faces(generate, classify, num_attributes, seeds, on_condition=None):
    """Readings (A, 2, K, A) in {-1, +1}: attribute i asked with sign SIGNS[s], seed k, attribute j read.

    generate(y, seeds) -> images in [-1, 1]; classify(images) -> (readings (K, A), features (K, D)).
    Also returns the features (A, 2, K, D) and the images (A, 2, K, 3, H, W) in [-1, 1].
    """
    readings, features, images = [], [], []
    for y in single_attribute_requests(num_attributes):
        faces = generate(y, seeds)
        images.append(faces)
        reading, feature = classify(faces)
        readings.append(reading)
        features.append(feature)
        if on_condition:
            on_condition()
    shape = (num_attributes, len(SIGNS), len(seeds))
    return (torch.stack(readings).view(*shape, -1), torch.stack(features).view(*shape, -1),
            torch.stack(images).view(*shape, *images[0].shape[1:]))


def control_rates(readings):
    """(A, 2): fraction of faces read as asked, per attribute and sign."""
    asked = torch.tensor(SIGNS).view(1, -1, 1)
    diagonal = torch.stack([readings[i, :, :, i] for i in range(readings.shape[0])])  # (A, 2, K)
    return (diagonal == asked).float().mean(-1)


def rates_by_sign(rates, attributes):
    """(A, 2) rates -> {attribute: {"for": rate, "against": rate}}, as the report stores them."""
    return {a: {"for": round(rates[i, 0].item(), 4), "against": round(rates[i, 1].item(), 4)}
            for i, a in enumerate(attributes)}


def leakage_matrix(readings):
    """(A, A): how often attribute j's reading changes when attribute i flips from +1 to -1, same seed."""
    return (readings[:, 0] != readings[:, 1]).float().mean(1)


def off_diagonal_mean(matrix):
    """Mean over i != j, per row (A,)."""
    off = ~torch.eye(matrix.shape[0], dtype=torch.bool)
    return (matrix * off).sum(1) / off.sum(1)


def held_flip_requests(shown, attribute, sign, exclusive):
    """Requests (K, A) that ask for `attribute` with `sign` and every other attribute as `shown` (K, A) in
    {-1, +1}, the readings of K faces, except what the flip rules out (attributes.hold_readings). Also
    returns `compared` (K, A): the attributes that should stay as shown, i.e. neither the flipped one nor
    one it ruled out."""
    requests, ruled_out = hold_readings(shown, add=[attribute] if sign > 0 else [],
                                        remove=[attribute] if sign < 0 else [], exclusive=exclusive)
    compared = ~ruled_out
    compared[:, attribute] = False
    return requests, compared


def read_held_flips(generate, classify, readings, seeds, exclusive, on_condition=None):
    """Flip each attribute with the others held, both ways: the faces asked SIGNS[1 - s] for attribute i
    (readings[i, 1 - s], from read_single_attribute_faces) are generated again with i set to SIGNS[s] and
    every other attribute asked as read, guided as `facegen generate` guides a face whose other attributes
    were drawn: `generate(requests, seeds, held)` with `held` the requests less the flip (guidance.composed).
    Returns their readings, the `compared` masks and the requests, all (A, 2, K, A), and the flipped images
    (A, 2, K, 3, H, W)."""
    flipped, compared, asked, images = [], [], [], []
    for i in range(readings.shape[0]):
        for s, sign in enumerate(SIGNS):
            requests, mask = held_flip_requests(readings[i, 1 - s], i, sign, exclusive)
            images.append(generate(requests, seeds, torch.where(mask, requests, 0.0)))
            flipped.append(classify(images[-1])[0])
            compared.append(mask)
            asked.append(requests)
            if on_condition:
                on_condition()
    return (torch.stack(flipped).view(readings.shape), torch.stack(compared).view(readings.shape),
            torch.stack(asked).view(readings.shape), torch.stack(images).view(*readings.shape[:3], *images[0].shape[1:]))


# A pair (i at s, j at t) that fewer than this fraction of the training faces with i at s show: the data
# hardly supports a flip of i to s that holds j at t (a mustache held on a face read as a woman's).
MIN_PAIR_SUPPORT = 0.01


def supported_held_flips(pair_frequency, requests, compared):
    """(A, 2, K) bool: the held flips (read_held_flips' requests and compared masks) whose every held
    attribute, beside the flip, is a pair the training faces support (LabelPrior.pair_frequency)."""
    support = torch.ones(requests.shape[:3], dtype=torch.bool)
    for i in range(requests.shape[0]):
        for s in range(2):
            frequency = pair_frequency[i, s]  # (A, 2): P(j at +1 | i at SIGNS[s]), P(j at -1 | ...)
            shown = torch.where(requests[i, s] > 0, frequency[:, 0], frequency[:, 1])  # (K, A)
            support[i, s] = ((shown >= MIN_PAIR_SUPPORT) | ~compared[i, s]).all(-1)
    return support


def supported_requests(pair_frequency, requests):
    """(R,) bool: the requests (R, A) every asked pair of which the training faces support (at least
    MIN_PAIR_SUPPORT of the faces with one show the other as asked; a woman with a mustache is not)."""
    supported = []
    for y in requests:
        asked = [(i, SIGNS.index(int(y[i].sign()))) for i in torch.nonzero(y).flatten().tolist()]
        supported.append(all(pair_frequency[i, s, j, t] >= MIN_PAIR_SUPPORT for i, s in asked for j, t in asked
                             if i != j))
    return torch.tensor(supported, dtype=torch.bool)


def unsupported_pairs(pair_frequency, attributes, exclusive):
    """['mustache +1 with male -1 (0.4%)', ...]: the pairs under MIN_PAIR_SUPPORT, those one attribute rules
    out by itself (two hair colours) left out."""
    pairs = []
    for i, a in enumerate(attributes):
        for s, sign in enumerate(SIGNS):
            for j, b in enumerate(attributes):
                for t, other in enumerate(SIGNS):
                    share = pair_frequency[i, s, j, t].item()
                    if j != i and not (sign > 0 and other > 0 and exclusive[i, j]) and share < MIN_PAIR_SUPPORT:
                        pairs.append(f"{a} {sign:+d} with {b} {other:+d} ({100 * share:.1f}%)")
    return pairs


def rates_where(flipped, supported):
    """(A, 2) held-flip rates over the supported faces only, and (A, 2) how many those are."""
    asked = torch.tensor(SIGNS).view(1, -1, 1)
    shown = torch.stack([flipped[i, :, :, i] for i in range(flipped.shape[0])]) == asked  # (A, 2, K)
    faces = supported.sum(-1)
    return (shown & supported).sum(-1) / faces.clamp(min=1), faces


def held_flip_agreement(readings, flipped, compared):
    """(A,): fraction of the compared readings that are the same before the held flip (the face asked
    SIGNS[1 - s]) and after it, over both directions and all seeds."""
    before = readings.flip(1)  # before[i, s] = readings[i, 1 - s]
    return ((flipped == before) & compared).sum((1, 2, 3)) / compared.sum((1, 2, 3))


def free_flip_ceiling(labels):
    """(A,): the most 'others agree' can be when attribute i flips and the others are free, for a model that
    samples the data's labels (N, A) exactly. Per other attribute j, the best pairing of the +i and -i faces
    keeps j the same for 1 - |p(j | +i) - p(j | -i)| of seeds. Unknown labels (0) are left out; an
    attribute the data never shows both ways gets NaN."""
    present, known = (labels > 0).double(), (labels != 0).double()

    def rate_given(rows):  # p(j present | rows), over the faces whose label j is known
        return present[rows].sum(0) / known[rows].sum(0)

    shift = torch.stack([(rate_given(labels[:, i] > 0) - rate_given(labels[:, i] < 0)).abs()
                         for i in range(labels.shape[1])])
    return 1 - off_diagonal_mean(shift)


def combination_requests(attributes, count, seed=0):
    """`count` random requests of 2-4 attributes with random signs (fixed by `seed`), none contradictory."""
    rng = torch.Generator().manual_seed(seed)
    requests = []
    while len(requests) < count:
        size = int(torch.randint(2, 5, (1,), generator=rng))
        chosen = torch.randperm(len(attributes), generator=rng)[:size]
        signs = torch.randint(0, 2, (size,), generator=rng) * 2 - 1
        wanted = {attributes[i] for i, s in zip(chosen.tolist(), signs.tolist()) if s > 0}
        if any(pair <= wanted for pair in EXCLUSIVE):
            continue
        y = torch.zeros(len(attributes))
        y[chosen] = signs.float()
        requests.append(y)
    return torch.stack(requests)


def combination_control(readings, requests):
    """readings (C, K, A), requests (C, A): (fraction of faces showing every asked attribute,
    fraction of asked attribute readings that match)."""
    asked = requests != 0
    matches = (readings == requests.sign().long()[:, None]) | ~asked[:, None]
    return matches.all(-1).float().mean().item(), (matches & asked[:, None]).sum().item() / (
        asked.sum().item() * readings.shape[1])


def all_shown_where(readings, requests, which):
    """combination_control's share of faces showing every asked attribute, over the requests (R, A) where
    `which` (R,) holds; readings: one (K, A) per request."""
    kept = torch.stack([r for r, ok in zip(readings, which) if ok])
    return round(combination_control(kept, requests[which])[0], 4)


# Fewer held-out real faces labelled with a request than this, and how the classifier reads them says
# little: such a request is left out where the model's combinations are compared with real faces'
MIN_REAL_FACES = 20


def real_combination_control(readings, labels, requests):
    """How the classifier reads the held-out real faces labelled with each request: ((R,) the fraction of the
    faces whose labels agree with every asked attribute that it reads as every asked attribute, NaN where no
    face does; (R,) how many faces those are). What the model's combinations can be held to: where the
    classifier does not read real faces labelled so as asked (a beard without a mustache), it will not read
    the model's either. readings, labels (N, A) in {-1, +1} (labels 0: unknown, never agreeing)."""
    rates, faces = [], []
    for y in requests:
        asked = y != 0
        rows = ((labels == y.sign().long()) | ~asked).all(-1)
        faces.append(int(rows.sum()))
        rates.append(combination_control(readings[rows][None], y[None])[0] if rows.any() else float("nan"))
    return torch.tensor(rates), torch.tensor(faces)


def mean_pairwise_distance(features):
    """Mean L2 distance between the feature vectors (N, D) of different faces: diversity within a condition."""
    distances = torch.cdist(features.double(), features.double())
    n = len(features)
    return (distances.sum() / (n * (n - 1))).item()


def condition_diversity(features):
    """mean_pairwise_distance within each condition of single-attribute faces' features (A, 2, K, D),
    averaged over the 2A conditions."""
    return sum(map(mean_pairwise_distance, features.flatten(0, 1))) / (features.shape[0] * features.shape[1])


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2). In the classifier's feature space, this is
    an FID-like number, not Inception FID."""
    if min(len(a), len(b)) < 2:
        raise FacegenError(f"a Fréchet distance needs at least 2 faces on each side, not {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()  # tr((S_a S_b)^1/2)
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def inception_weights_offline():
    """torch-fidelity's Inception weights where its own download put them (torch hub's cache), or None to
    let it download them. Offline (HF_HUB_OFFLINE) and not cached: FacegenError, without trying the network."""
    from huggingface_hub import constants
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    if cached.is_file():
        return str(cached)
    if constants.HF_HUB_OFFLINE:
        raise FacegenError(f"Inception FID unavailable: offline (HF_HUB_OFFLINE) and no weights in {cached.parent}; "
                           "give --inception-weights")
    return None


def inception_fid_to(real, weights=None, feature=2048, batch_size=64):
    """The standard FID to the uint8 images `real` (N, H, W, 3): returns fid(generated) -> float.

    torchmetrics' FrechetInceptionDistance with torch-fidelity's Inception-v3 (`pip install -e ".[fid]"`);
    the real images go through Inception once, however many generated sets are measured. The weights
    are downloaded on first use; offline, give `weights`, a local copy of torch-fidelity's
    weights-inception-2015-12-05 file. `feature` may also be any nn.Module mapping uint8 images to
    features (tests use a small one). Raises FacegenError when it cannot be measured.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if weights is None and isinstance(feature, int):  # Inception itself, not a test's own extractor
            weights = inception_weights_offline()
        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights,
                                          reset_real_features=False)
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # missing packages, no network, bad weights
        raise FacegenError(f"Inception FID unavailable: {first_line(e)}") from None

    def update(images, is_real):
        for chunk in torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).split(batch_size):
            metric.update(chunk, real=is_real)

    def fid(generated):
        metric.reset()  # forgets the previous generated set, keeps the real one
        update(generated, is_real=False)
        return metric.compute().item()

    update(real, is_real=True)
    return fid


def attribute_grid(images, columns=8):
    """Two rows of faces (2, K, 3, H, W) in [-1, 1] -> uint8 (H', W', 3): the first `columns` of each."""
    faces = images[:, :columns].reshape(-1, *images.shape[2:])
    return image_grid(to_uint8(faces), min(columns, images.shape[1]))


@dataclass
class HeldOutFaces:
    """A labelled folder's test faces as the evaluation reads them, labels in the model's attribute order."""
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: Optional[torch.Tensor]  # (N, A); None where the folder does not label every attribute
    points: Optional[list] = None  # named landmarks per face in the S x S frame (built-in faces: edits measurable)
    train_labels: Optional[torch.Tensor] = None  # the train split's labels, for the free-flip ceiling


def load_held_out_faces(data, attributes, size):
    """The test split of a labelled folder at `size`, with its landmarks when the folder lists them."""
    images, labels, data_attributes = load_images_and_labels(data, "test", size)
    if len(images) < 2:  # found now, not after the whole evaluation was sampled
        raise FacegenError(f"{data}: its test split holds {len(images)} readable face(s); the Fréchet distances "
                           "against real faces need at least 2")
    labels = torch.as_tensor(labels[:, [data_attributes.index(a) for a in attributes]]).long() \
        if set(attributes) <= set(data_attributes) else None
    train = read_dataset(data, "train")
    train_labels = train.labels[:, [train.attributes.index(a) for a in attributes]] \
        if set(attributes) <= set(train.attributes) else None
    landmarks, paths, points = read_landmarks(data), read_dataset(data, "test").paths, None
    if landmarks and len(paths) == len(images):
        with Image.open(paths[0]) as first:
            scale = size / first.width
        points = [{n: (x * scale, y * scale) for n, (x, y) in landmarks[p.name].items()} for p in paths]
    return HeldOutFaces(images, labels, points, train_labels)


@dataclass
class GuidanceResult:
    """What `facegen eval` measures at one guidance (report.json's guidance.<scale>)."""
    control: dict  # {attribute: {"for": rate, "against": rate}}
    others_agree_when_flipped: dict  # {attribute: rate}, the others free
    # {"control": {attribute: {for, against}}, "others_agree": {attribute: rate}}; with a label prior also
    # "control_supported" and "supported_faces" (the flips whose held pairs the data supports) and their
    # "supported_mean"
    flip_others_held: dict
    leakage_matrix: list  # (A, A)
    leakage_off_diagonal_mean: float
    # {"requests": [...], "all_asked_shown": rate, "each_asked_shown": rate, "all_asked_shown_per_request":
    # [...]}; with a label prior, "supported" (per request) and "all_asked_shown_supported"; with labelled
    # held-out faces, "all_asked_shown_compared" (over EvalReport.combinations_real's compared requests)
    combinations: dict
    diversity: float
    frechet_classifier_features: Optional[float] = None  # with held-out faces
    diversity_real: Optional[float] = None
    inception_fid: Optional[float] = None
    inception_fid_unavailable: Optional[str] = None  # why it was not measured


@dataclass
class EvalReport:
    """report.json: the model, the seeds, the classifier's own accuracy, and a GuidanceResult per guidance."""
    model: str
    seeds: list  # [first, last]
    faces_per_condition: int
    classifier_test_accuracy: dict
    guidance: dict = field(default_factory=dict)  # {str(guidance): GuidanceResult}
    free_flip_ceiling: Optional[dict] = None
    free_faces: Optional[dict] = None  # free_face_figures at the model's own guidance
    unsupported_pairs: Optional[list] = None  # with a label prior: the pairs a held flip cannot count on
    # with labelled held-out faces: {"faces_per_request": [...], "all_asked_shown_per_request": [...] (None
    # where no face), "compared": [...] (supported, where a prior says, and at least MIN_REAL_FACES faces)}
    combinations_real: Optional[dict] = None
    edit_locality: Optional[dict] = None

    def to_dict(self):
        """As report.json holds it: what was not measured is left out."""
        def measured(instance):
            return {k: v for k, v in dataclasses.asdict(instance).items() if v is not None}
        return {**measured(self), "guidance": {g: measured(r) for g, r in self.guidance.items()}}


def measure_guidance(pipe, classifier, settings, *, seeds, combos, real_features, fid, fid_unavailable, advance,
                     combos_supported=None, beside_real=None):
    """(GuidanceResult, single-attribute images (A, 2, K, 3, H, W), held-flip images) at settings.guidance.
    combos_supported: (R,) bool, the combinations whose pairs the label prior supports (supported_requests; None
    without a prior); beside_real: (R,) bool, those compared with their real faces (combinations_real's
    "compared")."""
    attributes = pipe.attributes
    generate = lambda y, s, drawn=None: pipe.generate(y, s, settings, drawn=drawn)  # noqa: E731
    readings, features, images = read_single_attribute_faces(generate, classifier.read, len(attributes), seeds, advance)
    control, leakage = control_rates(readings), leakage_matrix(readings)
    flipped, compared, requests, flipped_images = read_held_flips(generate, classifier.read, readings, seeds,
                                                                  exclusive_pairs(attributes), advance)
    held_control, held_agree = control_rates(flipped), held_flip_agreement(readings, flipped, compared)
    flip_others_held = {"control": rates_by_sign(held_control, attributes),
                        "others_agree": {a: round(held_agree[i].item(), 4) for i, a in enumerate(attributes)}}
    if pipe.prior is not None:
        supported = supported_held_flips(pipe.prior.pair_frequency(), requests, compared)
        rates, faces = rates_where(flipped, supported)
        flip_others_held.update(control_supported=rates_by_sign(rates, attributes),
                                supported_faces={a: {"for": int(faces[i, 0]), "against": int(faces[i, 1])}
                                                 for i, a in enumerate(attributes)},
                                supported_mean=round(rates[faces > 0].mean().item(), 4))
    combo_readings = []
    for y in combos:  # as `facegen generate` makes them: the attributes not asked drawn from the label prior
        conditions, drawn = pipe.draw_free(y, seeds)
        combo_readings.append(classifier.predict(generate(conditions, seeds, drawn)))
        if advance:
            advance()
    all_asked, each_asked = combination_control(torch.stack(combo_readings), combos) if combo_readings else (0.0, 0.0)
    combinations = {"requests": [describe(attributes, y) for y in combos],
                    "all_asked_shown": round(all_asked, 4), "each_asked_shown": round(each_asked, 4),
                    "all_asked_shown_per_request": [round(combination_control(r[None], y[None])[0], 4)
                                                    for r, y in zip(combo_readings, combos)]}
    if combos_supported is not None and combo_readings:
        combinations["supported"] = combos_supported.tolist()
        if combos_supported.any():
            combinations["all_asked_shown_supported"] = all_shown_where(combo_readings, combos, combos_supported)
    if beside_real is not None and beside_real.any():
        combinations["all_asked_shown_compared"] = all_shown_where(combo_readings, combos, beside_real)
    result = GuidanceResult(
        control=rates_by_sign(control, attributes),
        others_agree_when_flipped=dict(zip(attributes, [round(1 - v, 4) for v in off_diagonal_mean(leakage).tolist()])),
        flip_others_held=flip_others_held,
        leakage_matrix=[[round(v, 4) for v in row] for row in leakage.tolist()],
        leakage_off_diagonal_mean=round(off_diagonal_mean(leakage).mean().item(), 4),
        combinations=combinations,
        diversity=round(condition_diversity(features), 4))
    if real_features is not None:
        result.frechet_classifier_features = round(frechet_distance(real_features, features.flatten(0, 2)), 4)
        result.diversity_real = round(mean_pairwise_distance(real_features[:len(seeds)]), 4)
    if fid is not None:
        result.inception_fid = round(fid(to_uint8(images.flatten(0, 2))), 4)
    result.inception_fid_unavailable = fid_unavailable
    return result, images, flipped_images


def free_face_figures(pipe, classifier, real, *, seeds, settings, identity=False):
    """Faces with nothing asked, two ways: their attributes drawn from the model's label prior and guided to
    at settings.drawn_guidance ("prior"; what `facegen generate` does), and left free ("free": unguided). Fréchet distances to the real
    faces `real` (uint8 (N, S, S, 3)) past the first len(seeds), in the classifier's features and, with
    `identity` (the identity extra), in dlib's face-recognition embedding; "real" is the first len(seeds)
    real faces' own distance, the floor. Returns {"faces": n, "real": {...}, "prior": {...}, "free": {...}}."""
    n = len(seeds)
    if len(real) < 2 * n:
        raise FacegenError(f"free-face figures on {n} faces need {2 * n} held-out faces, not {len(real)}")
    nothing = torch.zeros(len(pipe.attributes))
    faces = {"real": real[:n], "free": to_uint8(pipe.generate(nothing, seeds, settings))}
    conditions, drawn = pipe.draw_free(nothing, seeds)
    if drawn is not None:
        faces["prior"] = to_uint8(pipe.generate(conditions, seeds, settings, drawn=drawn))
    embeddings = {"classifier": lambda images: classifier.embed(to_tensor(images)).cpu()}
    references = {"classifier": embeddings["classifier"](real[n:])}
    if identity:
        from .identity import FaceEmbedder, aligned_embeddings

        embedder = FaceEmbedder()
        reference, boxes = aligned_embeddings(embedder, real[n:])
        typical = tuple(np.median(boxes, axis=0))  # where a generated face dlib does not find is embedded
        references["dlib"] = torch.from_numpy(reference)
        embeddings["dlib"] = lambda images: torch.from_numpy(aligned_embeddings(embedder, images, fallback=typical)[0])
    figures = {"faces": n}
    for name, images in faces.items():
        figures[name] = {f"frechet_{space}": float(f"{frechet_distance(embed(images), references[space]):.4g}")
                         for space, embed in embeddings.items()}
    return figures


def save_grids(folder, attributes, guidance, images, flipped_images):
    """OUT/grids/<attribute>-g<guidance>.png (for, against) and <attribute>-held-g<guidance>.png."""
    for i, name in enumerate(attributes):
        save_image(Image.fromarray(attribute_grid(images[i])), folder / f"{name}-g{guidance:g}.png",
                   {"facegen": {"attribute": name, "guidance": guidance, "rows": "for, against"}})
        before_after = torch.stack([images[i, 1], flipped_images[i, 0]])
        save_image(Image.fromarray(attribute_grid(before_after)), folder / f"{name}-held-g{guidance:g}.png",
                   {"facegen": {"attribute": name, "guidance": guidance,
                                "rows": "asked against, the same faces with it added and the others held"}})


def evaluate_model(pipe, classifier, classifier_report, out, *, num_seeds=32, guidances=(3.0,), settings=None,
                   held_out=None, combinations=8, first_seed=0, fid_to=None, free_faces=200, identity=False,
                   progress=None):
    """Measure `pipe` with `classifier` at each guidance and write OUT/report.json, OUT/report.md,
    OUT/grids/<attribute>-g<guidance>.png and OUT/plots/*.png. Returns the EvalReport.

    settings: the SampleConfig to sample with (default: the model's), its guidance replaced by each of
              `guidances`.
    held_out: optional HeldOutFaces: the real side of the Fréchet distances, the free-flip ceiling from
              its train labels and, with landmarks, edit locality on its faces; with `free_faces` (a count,
              0: none) the figures of that many faces with nothing asked (free_face_figures, in dlib's
              embedding too with `identity`), where it holds twice as many faces.
    fid_to: optional fid_to(real_uint8) -> fid(generated_uint8) -> float, the standard FID
            (inception_fid_to); when it raises FacegenError the report says why it was not measured.
    """
    from .edit_request import EditRequest, edit_sample

    settings, out, attributes = settings or pipe.sample, Path(out), pipe.attributes
    if classifier.attributes != attributes:
        raise FacegenError(f"the classifier reads {', '.join(classifier.attributes)}, but the model asks "
                           f"{', '.join(attributes)}")
    if combinations < 0 or num_seeds < 1 or not guidances:
        raise FacegenError("evaluating needs at least one face per condition and one guidance")
    seeds = list(range(first_seed, first_seed + num_seeds))
    combos = combination_requests(attributes, combinations) if combinations else torch.zeros(0, len(attributes))
    task = progress.add_task("evaluating", total=len(guidances) * (4 * len(attributes) + combinations)) \
        if progress else None
    advance = (lambda: progress.advance(task)) if progress else None
    real_readings, real_features = classifier.read(to_tensor(held_out.images)) if held_out is not None else (None, None)
    fid, fid_unavailable = None, None  # fid(generated images), or why there is none
    if fid_to is not None and held_out is not None:
        try:
            fid = fid_to(held_out.images)
        except FacegenError as e:
            fid_unavailable = str(e)
    report = EvalReport(model=pipe.info.preset, seeds=[seeds[0], seeds[-1]], faces_per_condition=num_seeds,
                        classifier_test_accuracy=classifier_report.get("test_accuracy", {}))
    if pipe.prior is not None:
        report.unsupported_pairs = unsupported_pairs(pipe.prior.pair_frequency(), attributes,
                                                     exclusive_pairs(attributes))
    if held_out is not None and held_out.train_labels is not None:
        ceiling = free_flip_ceiling(held_out.train_labels).tolist()
        report.free_flip_ceiling = {a: None if math.isnan(v) else round(v, 4) for a, v in zip(attributes, ceiling)}
    supported = supported_requests(pipe.prior.pair_frequency(), combos) if pipe.prior is not None else None
    compared = None
    if held_out is not None and held_out.labels is not None and len(combos):
        rates, faces = real_combination_control(real_readings, held_out.labels, combos)
        compared = faces >= MIN_REAL_FACES
        if supported is not None:
            compared &= supported
        report.combinations_real = {"faces_per_request": faces.tolist(), "compared": compared.tolist(),
                                    "all_asked_shown_per_request": [None if math.isnan(v) else round(v, 4)
                                                                    for v in rates.tolist()]}
        if compared.any():
            report.combinations_real["all_asked_shown_compared"] = round(rates[compared].mean().item(), 4)
    for guidance in guidances:
        result, images, flipped_images = measure_guidance(
            pipe, classifier, dataclasses.replace(settings, guidance=guidance), seeds=seeds, combos=combos,
            real_features=real_features, fid=fid,
            fid_unavailable=fid_unavailable, advance=advance, combos_supported=supported,
            beside_real=compared)
        report.guidance[str(guidance)] = result
        save_grids(out / "grids", attributes, guidance, images, flipped_images)
    if held_out is not None and free_faces and len(held_out.images) >= 2 * free_faces:
        report.free_faces = free_face_figures(pipe, classifier, held_out.images, settings=settings,
                                              seeds=list(range(first_seed, first_seed + free_faces)), identity=identity)
    if held_out is not None and held_out.points is not None and held_out.labels is not None:
        report.edit_locality = edit_locality(pipe, classifier, held_out, EditRequest(sample=edit_sample(settings)))
    written = report.to_dict()  # the plots and the markdown read what report.json holds
    save_plots(written, attributes, out / "plots")
    write_json(out / "report.json", written)
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(report_markdown(written, attributes))
    return report


def save_plots(report, attributes, folder):
    """The leakage heat-map at the largest guidance and control-vs-guidance curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    guidances = sorted(report["guidance"], key=float)
    last = report["guidance"][guidances[-1]]
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(last["leakage_matrix"], vmin=0, vmax=1, cmap="magma")
    axes.set_xticks(range(len(attributes)), attributes, rotation=60, ha="right")
    axes.set_yticks(range(len(attributes)), attributes)
    axes.set_xlabel("attribute read (changed?)")
    axes.set_ylabel("attribute flipped (+1 -> -1)")
    axes.set_title(f"Leakage at guidance {guidances[-1]}")
    figure.colorbar(image)
    figure.tight_layout()
    save_figure(figure, folder / "leakage.png")

    figure, axes = plt.subplots(figsize=(7, 5))
    for name in attributes:
        rates = [(report["guidance"][g]["control"][name]["for"] + report["guidance"][g]["control"][name]["against"]) / 2
                 for g in guidances]
        axes.plot([float(g) for g in guidances], rates, marker="o", label=name)
    axes.set_xlabel("guidance")
    axes.set_ylabel("control (mean of +1 and -1)")
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    save_figure(figure, folder / "control-vs-guidance.png")


def percent(fraction):
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def report_markdown(report, attributes):
    lines = [f"# facegen evaluation: {report['model']}", "",
             f"{report['faces_per_condition']} faces per condition (seeds {report['seeds'][0]}..{report['seeds'][1]}); "
             "each attribute asked for alone (+1) and against (-1), the other attributes left free.", "",
             "Control: the fraction of faces the attribute classifier reads as asked. Others agree (free): the "
             "fraction of the other attributes' readings that stay the same between the +1 and -1 face of one seed, "
             "the others left free"
             + (", beside the most a model could reach that samples the data's labels exactly (ceiling: the data "
                "ties attributes together, e.g. beards to men)" if "free_flip_ceiling" in report else "") + ".", "",
             "Held flip: each of those faces again, same seed, asking for every attribute as the classifier read it "
             "except the flipped one (the same face with one attribute changed; adding one hair colour or baldness "
             "also takes away what it rules out, which is then not compared), guided as `facegen generate` guides "
             "a face whose other attributes were drawn: from the held readings to the flip. Held +1 / -1: how often "
             "the flipped face shows the flip"
             + ("; supported: the same over the faces whose held readings are all pairs the training faces support "
                f"beside the flip (at least {100 * MIN_PAIR_SUPPORT:g}% of the faces with the flip show each), and how "
                "many those are" if "unsupported_pairs" in report else "")
             + "; others agree (held): how often the other readings stay the same. Combinations: the attributes not "
             "asked drawn from the label prior, as `facegen generate` does.", ""]
    ceiling, real = report.get("free_flip_ceiling"), report.get("combinations_real")
    for guidance, result in report["guidance"].items():
        held = result["flip_others_held"]
        supported = "control_supported" in held
        lines += [f"## Guidance {guidance}", "",
                  "| attribute | control +1 | control -1 | others agree (free) | " + ("ceiling | " if ceiling else "")
                  + "held +1 | held -1 | " + ("held +1 supported | held -1 supported | " if supported else "")
                  + "others agree (held) | classifier accuracy |",
                  "|---|---|---|---|" + ("---|" if ceiling else "") + "---|---|" + ("---|---|" if supported else "")
                  + "---|---|"]
        for name in attributes:
            c, h = result["control"][name], held["control"][name]
            cells = [percent(v) for v in (c["for"], c["against"], result["others_agree_when_flipped"][name])]
            cells += [percent(ceiling[name])] if ceiling else []
            cells += [percent(h["for"]), percent(h["against"])]
            if supported:
                cells += [f"{percent(held['control_supported'][name][k])} ({held['supported_faces'][name][k]})"
                          for k in ("for", "against")]
            cells += [percent(held["others_agree"][name]), percent(report["classifier_test_accuracy"].get(name))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        combos = result["combinations"]
        lines += [""] + ([f"Held flips over the pairs the data supports, mean of the 24 rates: "
                          f"{100 * held['supported_mean']:.1f}%"] if supported else [])
        lines += [f"Leakage (off-diagonal mean of the flip matrix): {100 * result['leakage_off_diagonal_mean']:.2f}%",
                  f"Combinations of 2-4 attributes ({len(combos['requests'])} requests): every asked attribute shown "
                  f"on {100 * combos['all_asked_shown']:.1f}% of faces; each asked attribute shown "
                  f"{100 * combos['each_asked_shown']:.1f}% of the time"
                  + (f"; over the {sum(combos['supported'])} requests whose pairs the data supports, every asked "
                     f"attribute shown on {100 * combos['all_asked_shown_supported']:.1f}%"
                     if combos.get("all_asked_shown_supported") is not None else "")
                  + (f"; over the {sum(real['compared'])} of those with at least {MIN_REAL_FACES} held-out real faces "
                     f"labelled so, {100 * combos['all_asked_shown_compared']:.1f}% (the real faces themselves: "
                     f"{100 * real['all_asked_shown_compared']:.1f}%)" if "all_asked_shown_compared" in combos else "")
                  + ".",
                  f"Diversity (mean pairwise distance in the classifier's feature space, within a condition): "
                  f"{result['diversity']:.3f}" + (f" (real faces: {result['diversity_real']:.3f})"
                                                  if "diversity_real" in result else ""), ""]
        if "frechet_classifier_features" in result:
            lines += [f"Fréchet distance to held-out real faces in the classifier's feature space (not Inception "
                      f"FID): {result['frechet_classifier_features']:.3f}", ""]
        if "inception_fid" in result:
            lines += [f"Inception FID (torchmetrics) to held-out real faces: {result['inception_fid']:.3f}", ""]
        elif "inception_fid_unavailable" in result:
            lines += [f"Inception FID: not measured ({result['inception_fid_unavailable']}).", ""]
    if real:
        results = report["guidance"]
        lines += ["## Combinations beside real faces", "",
                  "Each request: the share of the model's faces that show every asked attribute, at each guidance, "
                  "and of the held-out real faces labelled with it, the share the classifier reads as asked (how many "
                  "those are): where the classifier does not read real faces labelled so as asked, it will not read "
                  "the model's either. Compared: the data supports the request's pairs and has at least "
                  f"{MIN_REAL_FACES} real faces of it.", "",
                  "| request | " + " | ".join(f"guidance {g}" for g in results) + " | real faces | compared |",
                  "|---|" + "---|" * (len(results) + 2)]
        requests = next(iter(results.values()))["combinations"]["requests"]
        for k, request in enumerate(requests):
            shown = [percent(r["combinations"]["all_asked_shown_per_request"][k]) for r in results.values()]
            lines.append(f"| {request} | " + " | ".join(shown) + f" | {percent(real['all_asked_shown_per_request'][k])}"
                         f" ({real['faces_per_request'][k]}) | {'yes' if real['compared'][k] else 'no'} |")
        lines.append("")
    if report.get("unsupported_pairs"):
        lines += ["## Pairs the data hardly supports", "",
                  f"Under {100 * MIN_PAIR_SUPPORT:g}% of the training faces with the first attribute so also show the "
                  "second so (the model's label prior): a held flip to the first that holds the second cannot count "
                  "on the model having learnt it.", "", "; ".join(report["unsupported_pairs"]), ""]
    if "free_faces" in report:
        free = report["free_faces"]
        spaces = [key for key in free["real"]]
        lines += ["## Faces with nothing asked", "",
                  f"{free['faces']} faces, Fréchet distance to held-out real faces (real: {free['faces']} other real "
                  "faces, the floor; prior: the attributes drawn from the model's label prior and guided to, as "
                  "`facegen generate` does; free: all left free, unguided).", "",
                  "| faces | " + " | ".join(key.replace("frechet_", "") for key in spaces) + " |",
                  "|---|" + "---|" * len(spaces)]
        for name in ("real", "prior", "free"):
            if name in free:
                lines.append(f"| {name} | " + " | ".join(f"{free[name][key]:.4g}" for key in spaces) + " |")
        lines.append("")
    if "edit_locality" in report:
        lines += ["## Edit locality (`--add` on held-out faces without the attribute)", "",
                  "| attribute | faces | success | PSNR outside mask | SSIM outside mask | pixels changed outside | "
                  "others changed | texture inside / around (before) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in report["edit_locality"].items():
            lines.append(f"| {name} | {r['faces']} | {percent(r['success'])} | {r['psnr_outside']} | "
                         f"{r['ssim_outside']} | {r['pixels_changed_outside']} | {percent(r['others_changed'])} | "
                         f"{r['texture_ratio']:.2f} ({r['texture_ratio_before']:.2f}) |")
        lines += ["", "Texture: mean |Laplacian| inside the mask over that in an 8-pixel band around it; an edit "
                  "that carries the photo's grain stays near the unedited face's ratio (in brackets).", ""]
    return "\n".join(lines) + "\n"


def edit_locality(pipe, classifier, faces, request, num_faces=16):
    """Edit locality per attribute on aligned faces with known landmarks (HeldOutFaces with points).

    For each attribute, the first `num_faces` faces whose label is -1 get `--add attribute` (`request`
    with that attribute added: its sampler settings, resampling, mask growth and seed). Returns
    {attribute: {success, psnr_outside, ssim_outside, others_changed, pixels_changed_outside, texture_ratio,
    texture_ratio_before, faces}}: the fraction the classifier then reads as having it, PSNR and SSIM over
    the pixels outside the mask (inf and 1.0 when untouched), how often the other attributes' readings
    change (not counting those the added one rules out, as in the held flip), the number of pixels changed
    outside the mask, and the high-frequency energy inside the mask over that of the face around it after
    the edit (texture_ratio; near texture_ratio_before, the same measure on the unedited face, when the
    new region carries the photo's grain and sharpness, well below it when it is a smooth patch).
    """
    from .edit import ON_THE_PERSON, edit_crops, region_mask
    from .landmarks import FaceFinder

    results = {}
    attributes = pipe.attributes
    exclusive = exclusive_pairs(attributes)
    finder = FaceFinder()  # its person segmentation: hair-colour regions are cut to the person
    try:
        for i, name in enumerate(attributes):
            chosen = torch.nonzero(faces.labels[:, i] < 0).flatten()[:num_faces].tolist()
            if not chosen:
                continue
            before = faces.images[chosen]
            masks = np.stack([region_mask([name], faces.points[k], before.shape[1], grow=request.mask_grow,
                                          person=finder.person(faces.images[k]) if name in ON_THE_PERSON else None)
                              for k in chosen])
            current = classifier.predict(to_tensor(before))
            after = edit_crops(pipe, before, masks, dataclasses.replace(request, add=(name,)), current)
            read_after = classifier.predict(to_tensor(after))
            outside = np.repeat(masks[..., None] == 0, 3, axis=-1)
            # the others: every attribute but the added one and what it rules out (bangs under a bald head)
            compared = held_flip_requests(current, i, 1, exclusive)[1]
            results[name] = {
                "faces": len(chosen),
                "success": round((read_after[:, i] == 1).float().mean().item(), 4),
                "psnr_outside": psnr_uint8(after[outside], before[outside]),
                "ssim_outside": global_ssim(after * outside, before * outside),
                "others_changed": round((((read_after != current) & compared).sum() / compared.sum()).item(), 4),
                "pixels_changed_outside": int((after != before).any(-1)[masks == 0].sum()),
                "texture_ratio": round(high_frequency_ratio(after, masks), 4),
                "texture_ratio_before": round(high_frequency_ratio(before, masks), 4),
            }
    finally:
        finder.close()
    return results


def high_frequency_ratio(images, masks, ring=8):
    """Mean |Laplacian| of the grey levels inside the masks (> 0.5) over that in a `ring`-pixel band just
    outside them, over a batch of uint8 images (N, H, W, 3) and masks (N, H, W) in [0, 1]."""
    grey = torch.from_numpy(images.astype(np.float32).mean(-1))[:, None]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    energy = torch.nn.functional.conv2d(grey, kernel).abs()[:, 0]  # (N, H-2, W-2): valid pixels only
    mask = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, 1:-1, 1:-1]
    inside = mask > 0.5
    grown = torch.nn.functional.max_pool2d((mask > 0).float()[:, None], 2 * ring + 1, stride=1, padding=ring)[:, 0]
    band = (grown > 0) & (mask == 0)
    return (energy[inside].mean() / energy[band].mean().clamp(min=1e-6)).item()


def psnr_uint8(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else round(10 * np.log10(255**2 / mse), 3)


def global_ssim(a, b):
    """SSIM over whole images (one window); 1.0 exactly when they are equal."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = a.mean(), b.mean()
    cov = ((a - mu_a) * (b - mu_b)).mean()
    return round(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (a.var() + b.var() + c2)), 4)
