"""Attribute vocabulary: names, CelebA columns, CLI flag names and request vectors.

A request gives each attribute +1 (asked for), -1 (asked against) or 0 (left free).
"""

from .errors import FacegenError

DEFAULT_ATTRIBUTES = [
    "male",
    "young",
    "smiling",
    "eyeglasses",
    "beard",
    "mustache",
    "bald",
    "bangs",
    "black_hair",
    "blond_hair",
    "wearing_hat",
    "pale_skin",
]

# CelebA stores "No_Beard"; every other name maps to its capitalised column (gray_hair -> Gray_Hair).
_INVERTED_CELEBA_COLUMNS = {"beard": "No_Beard"}
# The word for -1 where "no-<name>" reads badly.
_OPPOSITES = {"male": "female", "young": "old"}


def celeba_column(name):
    """The CelebA column for an attribute, and whether its sign is inverted."""
    if name in _INVERTED_CELEBA_COLUMNS:
        return _INVERTED_CELEBA_COLUMNS[name], True
    return "_".join(word.capitalize() for word in name.split("_")), False


def flag_names(name):
    """CLI flags (positive, negative) for an attribute: ('--male', '--female'), ('--beard', '--no-beard')."""
    dashed = name.replace("_", "-")
    negative = _OPPOSITES.get(name, f"no-{dashed}")
    return f"--{dashed}", f"--{negative}"


def check_names(vocabulary, names):
    unknown = [n for n in names if n not in vocabulary]
    if unknown:
        raise FacegenError(
            f"unknown attribute{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"this model knows: {', '.join(vocabulary)}"
        )


def request_vector(vocabulary, wanted=(), unwanted=()):
    """Attribute vector (float, shape (A,)) with +1 for `wanted`, -1 for `unwanted`, 0 elsewhere."""
    wanted = [n.replace("-", "_") for n in wanted]
    unwanted = [n.replace("-", "_") for n in unwanted]
    check_names(vocabulary, wanted + unwanted)
    both = sorted(set(wanted) & set(unwanted))
    if both:
        raise FacegenError(f"attribute asked both for and against: {', '.join(both)}")
    import torch  # here, not at the top: the CLI imports this module to build its flags

    y = torch.zeros(len(vocabulary))
    for n in wanted:
        y[vocabulary.index(n)] = 1.0
    for n in unwanted:
        y[vocabulary.index(n)] = -1.0
    return y


def describe(vocabulary, y):
    """'male, beard, no-smiling' for a request vector; 'unconditional' when nothing is asked."""
    parts = []
    for name, value in zip(vocabulary, y.tolist()):
        if value > 0:
            parts.append(name)
        elif value < 0:
            parts.append(flag_names(name)[1][2:])
    return ", ".join(parts) or "unconditional"


# Pairs that cannot both be present (no built-in face has them together). When the rest of a face is
# held, adding one of them takes the other away.
EXCLUSIVE = {frozenset(p) for p in [("black_hair", "blond_hair"), ("bald", "bangs"), ("bald", "wearing_hat")]}


def exclusive_pairs(vocabulary):
    """(A, A) bool: True where attributes i and j cannot both be present."""
    import torch

    return torch.tensor([[frozenset((a, b)) in EXCLUSIVE for b in vocabulary] for a in vocabulary])


def hold_readings(readings, add, remove, exclusive):
    """Requests (B, A) that ask for every attribute as `readings` (B, A) in {-1, +1} show it, except the
    attribute indices `add` (asked for) and `remove` (asked against). An attribute read as present that an
    added one rules out (`exclusive` (A, A) bool; blond hair rules out black hair) is asked against
    instead. Returns the requests and where that happened (B, A)."""
    import torch

    ruled_out = torch.zeros_like(readings, dtype=torch.bool)
    for i in add:
        ruled_out |= exclusive[i] & (readings > 0)
    requests = torch.where(ruled_out, -1.0, readings.float())
    requests[:, list(add)] = 1.0
    requests[:, list(remove)] = -1.0
    return requests, ruled_out
