"""What an edit asks (`facegen edit`, the page's Edit tab, eval's edit locality): the attributes to add and
remove and how to sample them. Its defaults live here alone; the CLI's options show them. Light to import:
the CLI builds its options from it before torch is loaded."""

from dataclasses import dataclass, field, replace
from typing import Optional

from .attributes import AttributeRequest
from .config import SampleConfig
from .errors import FacegenError

# The sampler's start time inside the mask when no strength is given (1 = pure noise). Repainting from a
# partly noised latent keeps the region's colours and layout, which most edits want (the skin under a new
# mustache) but what a new hair colour or a bald head cannot have: those start from pure noise. A face
# made pale or male keeps its pose and light from 0.7 (on 16 held-out faces each, from 1.0 / 0.8 to 0.7:
# pale skin still read on all, the other readings changed 5.7 -> 2.3%; male: all, 23.9 -> 16.5%).
DEFAULT_STRENGTH = 0.8
TRAJECTORIES = ("flowedit", "inversion", "rf-inversion", "noise")
STRENGTHS = {"black_hair": 1.0, "blond_hair": 1.0, "bald": 1.0, "pale_skin": 0.7, "male": 0.7}
# The guidance when none is given, where the model's own (3) is too weak for the change: on 16 photos with
# FlowEdit, a mustache showed on 12 / 25 / 44% at guidance 3 / 5 / 7 (dlib identity 0.07 / 0.13 / 0.17), a
# beard on 60 / 73 / 80% (0.13 / 0.22 / 0.29), a smile on 60 / 100% at 3 / 5 (0.15 / 0.20); eyeglasses
# showed on 93% at 3 already, and 5 moved the identity 0.30 -> 0.38. A hat showed on 73 / 100% at 3 / 5
# (0.23 / 0.29). On the 38 photos of docs/faces-edit/photo-eval.md, pale skin showed on 38 / 76 / 85 / 85% at
# 3 / 5 / 6 / 7 (0.18 / 0.27 / 0.30 / 0.33), male on 74 / 95 / 95% at 3 / 3.5 / 4 (0.33 / 0.38 / 0.41), and
# with the lips kept (edit.REGIONS) a mustache on 16 of 17 men at 9, against 15 at 7 (0.23 against 0.18); a
# smile on 94 / 100 / 100% at 3.5 / 4 / 5 (0.26 / 0.28 / 0.30). Glasses kept as frames alone (edit.thin_overlay)
# showed on 76 / 92 / 95% at 3 / 4 / 5 by need (0.28 / 0.31 / 0.32).
GUIDANCES = {"mustache": 9.0, "beard": 5.0, "eyeglasses": 4.0, "smiling": 3.5, "wearing_hat": 5.0, "pale_skin": 6.0,
             "male": 3.5}
# Guidance by need: with no guidance given, each face is edited at these fractions of its change's guidance
# in turn and keeps the first whose change the classifier reads on the edited face as surely as on most real
# faces with it (the full guidance where none is): a face that takes the change easily is changed no more
# than it needs. The lowest rung, 0.35, came last: a mustache that showed at 4.5 on one face (dlib 0.46) showed at
# 3.15 too (38 photos: the largest 0.462 -> 0.361, shown on as many).
RUNGS = (0.35, 0.5, 0.75, 1.0)


def edit_sample(sample, steps=None):
    """The model's sampler settings as an edit takes them: Euler's steps (FlowEdit and an inversion step with
    their own integrators; fresh noise with RePaint's rounds takes Euler's), `steps` of them when given, else
    as many as the model's sampler makes model calls (a Heun step makes two, but the last): the edit figures
    were measured at 25 Euler steps, when the model sampled faces with them too. A distilled model's folder edits
    with its teacher (MODEL/dit) and classifier-free guidance (SampleConfig.undistilled): the student's few
    steps draw whole faces from the all-free reference, and an edit steers between two conditions."""
    sample = sample.undistilled()
    calls = 2 * sample.steps - 1 if sample.method == "heun" else sample.steps
    return replace(sample, steps=steps or calls, method="euler")


def _by_value(table):
    """'7 for mustache; 5 for beard, smiling' from {attribute: value}, the largest value first."""
    names = {}
    for name, value in table.items():
        names.setdefault(value, []).append(name)
    return "; ".join(f"{value:g} for {', '.join(group)}" for value, group in sorted(names.items(), reverse=True))


def guidance_help():
    """The --guidance help, from GUIDANCES and RUNGS."""
    fractions = ", ".join(f"{f:g}" for f in RUNGS)
    return (f"Classifier-free guidance for every face. Default: by need, each face the first of {fractions} times "
            f"its change's guidance ({_by_value(GUIDANCES)}; else the model's) at which the classifier reads the "
            f"change.")


def strength_help():
    """The --strength help, from STRENGTHS."""
    return f"How much to repaint: the sampler's start time (default {DEFAULT_STRENGTH:g}; {_by_value(STRENGTHS)})."


@dataclass
class EditRequest:
    """What to change in every face, and how to sample it (the model's `SampleConfig`, overridden): the one
    owner of the edit's defaults, which the CLI's options show."""
    add: tuple = ()
    remove: tuple = ()
    strength: Optional[float] = None  # sampler start time, 1 = pure noise inside the mask; None: see `start`
    sample: SampleConfig = field(default_factory=SampleConfig)  # its guidance used as given: see `settings`
    resample: int = 2  # RePaint rounds per step, with trajectory "noise": the second one blends the mask's edge
    # how the region is repainted: "flowedit" (no inversion: the edit steps along the difference of the asked
    # and the as-read velocities, so that what the two agree on does not move: repainting with nothing asked
    # gives the crop back exactly), "inversion" (the crop's own ODE trajectory, Heun's steps both ways: on
    # 38 photos, --add mustache moved dlib's identity 0.08 instead of 0.33, and repainting with nothing asked
    # 0.04 instead of 0.31) or "noise" (the crop's latent noised with fresh noise, RePaint's resampling)
    trajectory: str = "flowedit"
    guidance: Optional[float] = None  # None: the change's GUIDANCES, else the sample's
    mask_grow: int = 4  # pixels (of the aligned crop) the region mask is grown by
    # new content super-resolved (Real-ESRGAN x4plus) before it goes into a photo whose face is at least
    # edit.UPSCALE_FROM times the crop's size: off by default, since it costs 2-6 s a face on 2 cores and does
    # not make the model's flat new content (a mustache drawn as a dark band) look like hair
    upscale: bool = False
    # with a framed model (framing.py): a region repainted in the closest zoomed view of the face that holds it
    # and that the photo's pixels hold, so that a mustache gets more than two rows of latent cells
    zoom: bool = True
    seed: int = 0
    repaint: tuple = ()  # the attributes whose regions are repainted (default: the changed ones'); with
    # nothing changed, the pipeline's floor: what repainting a region costs the photo by itself

    @property
    def regions(self):
        return list(self.repaint) or self.changed

    def __post_init__(self):
        if self.trajectory not in TRAJECTORIES:
            raise FacegenError(f"unknown trajectory {self.trajectory!r}; use {', '.join(TRAJECTORIES)}")
        self.add = tuple(n.replace("-", "_") for n in self.add)
        self.remove = tuple(n.replace("-", "_") for n in self.remove)
        self.repaint = tuple(n.replace("-", "_") for n in self.repaint)

    @property
    def changed(self):
        return list(self.add) + list(self.remove)

    @property
    def settings(self):
        """The sampler settings of this edit: the sample's, with the guidance given or the largest of the
        changes' GUIDANCES (the sample's for the rest)."""
        guidance = self.guidance if self.guidance is not None else max(
            (GUIDANCES.get(name, self.sample.guidance) for name in self.changed), default=self.sample.guidance)
        return replace(self.sample, guidance=guidance)

    @property
    def rungs(self):
        """The guidances tried in turn (edit.edit_until_shown): RUNGS of the settings' guidance, or the guidance
        given alone."""
        full = self.settings.guidance
        return (full,) if self.guidance is not None else tuple(fraction * full for fraction in RUNGS)

    def shown(self, logits, vocabulary, typical=None):
        """[bool] per face: whether the classifier's `logits` ((B, A), of `vocabulary`) show the whole change,
        every added attribute read at least as surely as most real faces with it are (above `typical`'s "with"
        logit: the classifier's typical_logits) and every removed one as surely not (below its "without"
        one); never less surely than the classifier's own call (0), which is all there is without `typical`."""
        typical = typical or {}
        bars = [(vocabulary.index(n), 1, max(typical.get("with", {}).get(n, 0.0), 0.0)) for n in self.add] + \
               [(vocabulary.index(n), -1, min(typical.get("without", {}).get(n, 0.0), 0.0)) for n in self.remove]
        return [all(sign * (row[i] - bar) > 0 for i, sign, bar in bars) for row in logits.tolist()]

    @property
    def start(self):
        """The strength given, or the largest of the changes' STRENGTHS (DEFAULT_STRENGTH for the rest)."""
        if self.strength is not None:
            return self.strength
        return max((STRENGTHS.get(name, DEFAULT_STRENGTH) for name in self.regions), default=DEFAULT_STRENGTH)

    def attributes(self, vocabulary):
        """The change as an AttributeRequest of `vocabulary` (checked: known names, no contradiction), guided
        away from the face with the change reversed."""
        return AttributeRequest(vocabulary, self.add, self.remove, guide_from="reversed")
