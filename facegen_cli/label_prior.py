"""The joint label prior: which combinations of attributes the training faces had, and how often.

With every attribute left free, classifier-free guidance has nothing to push along (the condition is the
all-free reference itself) and faces come out unguided. Drawing the free attributes from the training data's
own joint distribution, given the asked ones, gives each face a complete, plausible condition to be guided
to: a man asked for gets a beard about as often as the data's men have one, and never a woman's
combination of labels. The draw is the face's own (from its seed), so a face depends on its seed and
request alone. Kept beside the model as MODEL/labels.json.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FacegenError, first_line

PRIOR_FILE = "labels.json"
PRIOR_STREAM = 0x1AB  # the seeds' stream for drawn labels, apart from their noise
SIGNS = {"+": 1, "-": -1, "0": 0}


@dataclass(frozen=True)
class LabelPrior:
    """The distinct label vectors of a training set (K, A) in {-1, 0, +1} (0: unknown) and their counts (K,)."""
    attributes: tuple
    combinations: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_labels(cls, attributes, labels):
        """From a training set's labels (N, A)."""
        combinations, counts = torch.unique(torch.as_tensor(labels).to(torch.int8), dim=0, return_counts=True)
        return cls(tuple(attributes), combinations, counts)

    def draw(self, condition, seeds):
        """(conditions (B, A), drawn (B,) bool): each of `condition`'s ((A,) or (B, A)) free attributes (0)
        drawn from the training faces that agree with its asked ones, by seed; a face whose asked
        attributes no training face had together keeps them free (drawn False)."""
        condition = condition.expand(len(seeds), -1) if condition.ndim == 1 else condition
        requests, which = torch.unique(condition, dim=0, return_inverse=True)  # a few distinct requests
        asked = requests != 0
        agree = ((self.combinations[None] == requests[:, None].to(torch.int8)) | ~asked[:, None]).all(-1)  # (R, K)
        weights = (agree * self.counts[None]).double()
        supported = weights.sum(1) > 0
        chances = (weights / weights.sum(1, keepdim=True).clamp(min=1)).numpy()
        conditions = condition.clone().float()
        for i, (seed, r) in enumerate(zip(seeds, which.tolist())):
            if supported[r]:
                chosen = np.random.default_rng([seed, PRIOR_STREAM]).choice(len(self.counts), p=chances[r])
                conditions[i] = torch.where(asked[r], requests[r].float(), self.combinations[chosen].float())
        return conditions, supported[which]

    def pair_frequency(self):
        """(A, 2, A, 2): among the training faces with attribute i at SIGNS[s] (+1, then -1), the fraction
        with attribute j at SIGNS[t] (unknown labels count in neither); NaN where no face has i at SIGNS[s]."""
        shown = (self.combinations[:, :, None] == torch.tensor([1, -1], dtype=torch.int8)).double()  # (K, A, 2)
        joint = torch.einsum("k,kas,kbt->asbt", self.counts.double(), shown, shown)
        faces = torch.einsum("k,kas->as", self.counts.double(), shown)
        return joint / faces[:, :, None, None]

    def to_dict(self):
        return {"attributes": list(self.attributes),
                "combinations": {"".join("-0+"[v + 1] for v in row): int(n)
                                 for row, n in zip(self.combinations.tolist(), self.counts.tolist())}}

    def save(self, path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path, attributes):
        """MODEL/labels.json, checked against the model's `attributes`."""
        try:
            data = json.loads(Path(path).read_text())
            rows = [[SIGNS[c] for c in key] for key in data["combinations"]]
            counts = [int(n) for n in data["combinations"].values()]
            names = tuple(data["attributes"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FacegenError(f"{path}: not a label prior ({first_line(e)})") from None
        if names != tuple(attributes) or any(len(row) != len(names) for row in rows) or not rows \
                or min(counts) < 1:
            raise FacegenError(f"{path}: its labels are not the model's attributes ({', '.join(attributes)}), "
                               "or it lists no faces")
        return cls(names, torch.tensor(rows, dtype=torch.int8), torch.tensor(counts))


def prior_of_data(data, attributes):
    """The LabelPrior of a labelled folder's train split (all of it without a partition file), its columns
    in the order of `attributes`."""
    from .data import read_dataset

    dataset = read_dataset(data, "train")
    missing = [a for a in attributes if a not in dataset.attributes]
    if missing:
        raise FacegenError(f"{data}: its labels have no {missing[0]!r}, which the model asks")
    return LabelPrior.from_labels(attributes, dataset.labels[:, [dataset.attributes.index(a) for a in attributes]])
