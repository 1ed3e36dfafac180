"""A facegen model folder and what it does: latents <-> images and attribute-controlled sampling.

    MODEL/facegen.json   config.ModelInfo: image size, latent mean/std, preset name, sampler settings
    MODEL/dit/           LatentDiT.save_pretrained (config.json with the attribute vocabulary
                         + diffusion_pytorch_model.safetensors, EMA weights)
    MODEL/vae/           AutoencoderKL.save_pretrained
    MODEL/labels.json    label_prior.LabelPrior: the training faces' label combinations (optional)
    MODEL/guide/         a smaller LatentDiT of the same latents and attributes, the autoguidance guide
                         (optional; used where sample.autoguidance is set)
    MODEL/student/       the DiT distilled from MODEL/dit (distill.py; optional): one call per step and a few
                         steps where sample.distilled is set. MODEL/dit stays the plain velocity that edits,
                         inversion and classifier-free guidance call.
"""

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import guidance, sampling, vae as vae_lib
from .config import ModelInfo, Provenance, SampleConfig
from .devices import autocast, resolve_precision
from .errors import FacegenError, first_line
from .files import atomic_dir, save_pretrained
from .label_prior import PRIOR_FILE, LabelPrior
from .model import LatentDiT, inpainting_context

MODEL_FILE = "facegen.json"
GUIDE_FOLDER = "guide"
STUDENT_FOLDER = "student"
# The models inside the package, by name: real faces (CelebA) and the built-in drawn faces (exact labels).
FACES_MODEL = Path(__file__).parent / "faces"
DEMO_MODEL = Path(__file__).parent / "demo"
SHIPPED_MODELS = {"faces": FACES_MODEL, "demo": DEMO_MODEL}


def model_path(name_or_path=None):
    """The folder of a model: a shipped model's name (faces, demo) given as a string, any other string or a
    Path as a path, or None for the default (the real-face model where this installation ships it). A
    folder named like a shipped model is given as a path (./faces): a bare name is never shadowed by the
    folder `facegen generate` writes into."""
    if name_or_path is None:
        for path in SHIPPED_MODELS.values():
            if (path / MODEL_FILE).is_file():
                return path
        raise FacegenError("no --model given and this installation ships no model; "
                           "train one with `facegen train` and pass --model RUN/model")
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_MODELS:
        return SHIPPED_MODELS[name_or_path]
    return Path(name_or_path)


def check_guide(guide, dit, where):
    """Refuse a guide that cannot guide `dit`: other latents' shape or another attribute vocabulary."""
    for key in ("latent_size", "latent_channels"):
        if guide.config[key] != dit.config[key]:
            raise FacegenError(f"{where}: the guide's {key.replace('_', ' ')} is not the model's")
    if list(guide.attributes) != list(dit.attributes):
        raise FacegenError(f"{where}: the guide's attributes are not the model's")


def read_dit(folder, what, where=None):
    """The LatentDiT saved in `folder`; one that does not load is named in a one-line error as `what` ("the
    DiT") of `where` (default: the folder)."""
    try:
        return LatentDiT.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise FacegenError(f"{where or folder}: {what} checkpoint does not load: {first_line(e)}") from None


def load_guide(folder, dit):
    """MODEL/guide: the autoguidance guide's LatentDiT, checked against the model's `dit`."""
    guide = read_dit(folder, "the guide's")
    check_guide(guide, dit, folder)
    return guide


def load_student(folder, dit):
    """MODEL/student: the distilled LatentDiT, checked against the model's `dit` (its shape and attributes)."""
    student = read_dit(folder, "the student's")
    if not student.distilled:
        raise FacegenError(f"{folder}: not a distilled DiT")
    if student.architecture() != dit.architecture():
        raise FacegenError(f"{folder}: the student's shape or attributes are not the model's")
    return student


class FacegenPipeline:
    """A loaded model folder (the front door, as a diffusers pipeline is): its DiT, its VAE and its
    `ModelInfo`, whose `sample` settings every command starts from."""

    def __init__(self, dit, vae, info: ModelInfo, path=None, precision="fp32", prior: LabelPrior = None,
                 guide: LatentDiT = None, student: LatentDiT = None):
        """precision: devices.PRECISIONS (auto: bf16 where the DiT's device does it natively, else fp32);
        prior: the training faces' label combinations, which free attributes are drawn from (draw_free);
        guide: the weaker model autoguidance guides away from (guidance.autoguided);
        student: the DiT distilled from `dit` (guidance.distilled), which settings with distilled = true sample."""
        precision = resolve_precision(precision, dit.device)
        self.dit, self.vae, self.info, self.path, self.precision = dit, vae, info, path, precision
        self.prior, self.guide, self.student = prior, guide, student
        shape = (1, -1, 1, 1)
        self.latent_mean = torch.tensor(info.latent_mean).view(shape)
        self.latent_std = torch.tensor(info.latent_std).view(shape)

    @property
    def attributes(self):
        return self.dit.attributes

    @functools.cached_property
    def fingerprint(self):
        """A short hash of the weights that draw (the DiT's, the student's and its guidance gain if any, and
        the autoencoder's; vae.weights_fingerprint), written into every face and edited photo: the same model
        gives the same one on every machine."""
        parts = [vae_lib.weights_fingerprint(network) for network in (self.dit, self.student, self.vae)
                 if network is not None]
        if self.student is not None:
            parts.append(repr(float(self.student.config.guidance_gain)))
        return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]

    @property
    def sample(self) -> SampleConfig:
        return self.info.sample

    def settings(self, **overrides) -> SampleConfig:
        """The model's sampler settings with the given ones (None: keep the model's) put in."""
        return self.sample.overridden(**overrides)

    @property
    def device(self):
        return self.dit.device

    def autocast(self):
        """The context the networks run in: autocast in bf16 or fp16 (the latents are still integrated in
        float32), nothing in fp32."""
        return autocast(self.device, self.precision)

    @property
    def classifier_path(self):
        """MODEL/classifier, the attribute classifier the model folder carries, or None."""
        folder = self.path / "classifier" if self.path else None
        return folder if folder is not None and folder.is_dir() else None

    def load_classifier(self):
        """The attribute classifier the model folder carries, or None."""
        from .classifier import load_classifier

        return load_classifier(self.classifier_path, self.device)[0] if self.classifier_path else None

    @classmethod
    def load(cls, path=None, device="cpu", precision="fp32"):
        """A model folder (a path or a shipped model's name) on `device`, run in `precision` (see __init__)."""
        path = model_path(path)
        if not path.is_dir():
            raise FacegenError(f"{path}: no such model folder")
        if not (path / MODEL_FILE).is_file():
            raise FacegenError(f"{path}: not a facegen model (no {MODEL_FILE}); "
                               "give the model/ folder that `facegen train` writes")
        try:
            info = ModelInfo.from_dict(json.loads((path / MODEL_FILE).read_text()), path / MODEL_FILE)
        except (OSError, ValueError) as e:
            raise FacegenError(f"{path / MODEL_FILE}: not readable JSON ({first_line(e)})") from None
        dit = read_dit(path / "dit", "the DiT", where=path)
        if len(info.latent_mean) != dit.config.latent_channels:
            raise FacegenError(f"{path / MODEL_FILE}: latent_mean has {len(info.latent_mean)} values, but the DiT "
                               f"has {dit.config.latent_channels} latent channels")
        vae = vae_lib.load_vae(path / "vae", device)
        prior = LabelPrior.load(path / PRIOR_FILE, dit.attributes) if (path / PRIOR_FILE).is_file() else None
        guide = load_guide(path / GUIDE_FOLDER, dit) if (path / GUIDE_FOLDER).is_dir() else None
        if info.sample.autoguidance is not None and guide is None:
            raise FacegenError(f"{path / MODEL_FILE}: sets autoguidance but the folder has no {GUIDE_FOLDER}/ model")
        student = load_student(path / STUDENT_FOLDER, dit) if (path / STUDENT_FOLDER).is_dir() else None
        if info.sample.distilled and student is None:
            raise FacegenError(f"{path / MODEL_FILE}: samples distilled but the folder has no {STUDENT_FOLDER}/ model")
        ready = lambda network: network.to(device).eval().requires_grad_(False)  # noqa: E731
        return cls(ready(dit), vae, info, path, precision, prior, guide and ready(guide), student and ready(student))

    def replaced(self, **changes):
        """A copy of this pipeline with some of its parts replaced (the networks themselves are shared)."""
        pipe = copy.copy(self)
        pipe.__dict__.pop("fingerprint", None)  # of the weights it had
        pipe.__dict__.update(changes)
        return pipe

    def with_vae(self, vae, source):
        """This model with another autoencoder that has the same encoder, and so the same latents (a decoder
        fine-tuned with `facegen vae train --init VAE --decoder-only`)."""
        if vae_lib.vae_fingerprint(vae, encoder_only=True) != vae_lib.vae_fingerprint(self.vae, encoder_only=True):
            raise FacegenError(f"{source}: its encoder is not the model's, so its decoder would read other latents; "
                               "make one with `facegen vae train --init MODEL/vae --decoder-only`")
        info = dataclasses.replace(self.info, decoder=Provenance.of(source, vae_lib.vae_fingerprint(vae)))
        return self.replaced(vae=vae.to(self.device), info=info)

    def with_prior(self, prior: LabelPrior):
        """This model with another label prior (one of its attributes' training set)."""
        if prior.attributes != tuple(self.attributes):
            raise FacegenError(f"the label prior's attributes ({', '.join(prior.attributes)}) are not the model's "
                               f"({', '.join(self.attributes)})")
        return self.replaced(prior=prior)

    def with_guide(self, guide: "FacegenPipeline", scale):
        """This model autoguided at `scale` by another model's DiT (a smaller one, trained for less on the same
        latents: `facegen export --guide`)."""
        if guide.info.latent_mean != self.info.latent_mean or guide.info.latent_std != self.info.latent_std \
                or (guide.info.vae and self.info.vae and guide.info.vae.fingerprint != self.info.vae.fingerprint):
            raise FacegenError(f"{guide.path}: the guide was trained on other latents than the model")
        check_guide(guide.dit, self.dit, guide.path)
        info = dataclasses.replace(self.info, sample=dataclasses.replace(self.sample, autoguidance=scale))
        return self.replaced(guide=guide.dit.to(self.device), info=info)

    def save(self, path, dtype=None):
        """Write the model folder atomically; dtype=torch.float16 halves its size (loading casts back to
        float32)."""
        with atomic_dir(path) as tmp:
            self.write(tmp, dtype)
        return Path(path)

    def write(self, folder, dtype=None):
        """Write the model's files into an empty `folder` (save: atomically)."""
        for name, module in (("dit", self.dit), ("vae", self.vae), (GUIDE_FOLDER, self.guide),
                             (STUDENT_FOLDER, self.student)):
            if module is not None:
                save_pretrained(module, Path(folder) / name, dtype)
        (Path(folder) / MODEL_FILE).write_text(json.dumps(self.info.to_dict(), indent=2) + "\n")
        if self.prior is not None:
            self.prior.save(Path(folder) / PRIOR_FILE)

    def normalize(self, latents):
        return (latents - self.latent_mean.to(latents)) / self.latent_std.to(latents)

    def encode(self, images):
        """Images in [-1, 1] -> normalised latents, the DiT's data space."""
        with self.autocast():
            return self.normalize(vae_lib.encode(self.vae, images))

    def decode(self, latents):
        """Normalised latents -> images in [-1, 1]."""
        with self.autocast():
            return vae_lib.decode(self.vae, latents * self.latent_std.to(latents) + self.latent_mean.to(latents))

    @torch.inference_mode()
    def reconstruct(self, images):
        """Images in [-1, 1] through the autoencoder and back: what it keeps of them."""
        return self.decode(self.encode(images.to(self.device))).cpu()

    @staticmethod
    def generators(seeds):
        """One random stream per seed (on the CPU, so that a seed gives the same face on any device): its
        first draw is the face's starting noise (noise), the next ones the stochastic sampler's."""
        return [torch.Generator().manual_seed(s) for s in seeds]

    def noise(self, generators):
        """One Gaussian latent per generator, independent of batch composition."""
        shape = (self.dit.config.latent_channels, self.dit.config.latent_size, self.dit.config.latent_size)
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    def default_batch_size(self):
        """Faces per sampling batch when none is given: 16 on a CPU (larger batches are no faster there);
        on a GPU as many as a quarter of its free memory holds, at a generous estimate of what decoding one
        face takes (six float32 maps of the VAE's widest layer at full size), at most 1,024."""
        if self.device.type != "cuda":
            return 16
        per_face = 6 * 4 * max(self.vae.config.block_out_channels) * self.info.image_size ** 2
        return int(max(16, min(1024, torch.cuda.mem_get_info(self.device)[0] // 4 // per_face)))

    def draw_free(self, condition, seeds):
        """(conditions (len(seeds), A), drawn (len(seeds), A) or None): `condition` ((A,) or one per seed)
        with its free attributes drawn, by seed, from the label combinations of the training faces that
        agree with its asked ones (LabelPrior.draw), and those drawn attributes alone (the asked ones free),
        generate's `drawn`. Where the model carries no prior, or no training face had the asked attributes
        together, they stay free (None): guided from the all-free reference, a face with nothing asked is
        then not guided at all."""
        condition = condition.expand(len(seeds), -1) if condition.ndim == 1 else condition
        if self.prior is None:
            return condition.clone(), None
        conditions, supported = self.prior.draw(condition, seeds)
        if not supported.all():
            return condition.clone(), None
        return conditions, torch.where(condition != 0, 0.0, conditions)

    def _velocity(self, condition, reference, settings, inputs=None, drawn=None):
        if settings.distilled:
            if self.student is None:
                raise FacegenError("this model is not distilled: sample it with distilled = false")
            if inputs or reference.any():
                raise FacegenError("a distilled model's one call per step guides from the all-free reference "
                                   "alone; sample other guidance with distilled = false")
            return guidance.distilled(self.student, condition, drawn, settings.guidance, settings.drawn_guidance,
                                      1.0 / settings.steps)
        if drawn is not None and self.guide is not None and settings.autoguidance is not None:
            return guidance.autoguided(self.dit, self.guide, condition, drawn, settings.guidance, settings.autoguidance,
                                       settings.guidance_interval)
        if drawn is not None:
            return guidance.composed(self.dit, condition, drawn, reference, settings.guidance, settings.drawn_guidance,
                                     settings.guidance_interval)
        return guidance.classifier_free(self.dit, condition, reference, settings.guidance, inputs,
                                        settings.guidance_interval)

    def generate(self, condition, seeds, settings=None, *, reference=None, drawn=None, batch_size=None,
                 on_batch=None):
        """Images in [-1, 1], one per seed, for condition(s) of shape (A,) or (len(seeds), A), guided away
        from `reference` (same shapes; default: every attribute free), sampled with `settings` (a
        SampleConfig; default: the model's), `batch_size` at a time (default: default_batch_size()).
        `drawn`: the condition's free attributes drawn from the label prior, the asked ones free (draw_free):
        guided to at settings.drawn_guidance, the asked ones from there at settings.guidance
        (guidance.composed). A face depends on its seed and condition alone, not on the batch it was drawn in."""
        return torch.cat([images for _, images in self.generate_batches(
            condition, seeds, settings, reference=reference, drawn=drawn, batch_size=batch_size,
            on_batch=on_batch)])

    def generate_batches(self, condition, seeds, settings=None, *, reference=None, drawn=None, batch_size=None,
                         on_batch=None):
        """generate(), a batch at a time: yields (the batch's seeds, its images), so that a caller can write
        each batch as it is made and hold no more than one."""
        settings = settings or self.sample
        batch_size = batch_size or self.default_batch_size()
        condition = condition.expand(len(seeds), -1) if condition.ndim == 1 else condition
        reference = torch.zeros_like(condition) if reference is None else reference.expand_as(condition)
        times = sampling.time_grid(settings.steps, device=self.device)
        for start in range(0, len(seeds), batch_size):
            chunk = slice(start, start + batch_size)
            with torch.inference_mode():
                generators = self.generators(seeds[chunk])
                noise = self.noise(generators).to(self.device)
                velocity = self._velocity(condition[chunk].to(self.device), reference[chunk].to(self.device),
                                          settings, drawn=None if drawn is None else drawn[chunk].to(self.device))
                with self.autocast():
                    latents = sampling.sample(velocity, noise, times, method=settings.method, generators=generators,
                                              eta=settings.eta)
                images = self.decode(latents).cpu()
            if on_batch:
                on_batch(len(noise))
            yield seeds[chunk], images

    @torch.inference_mode()
    def inpaint(self, images, masks, condition, reference, *, seeds, strength=1.0, resample=1, settings=None,
                start="noise", source=None, framing=None):
        """Repaint `images` ((B, 3, S, S) in [-1, 1]) where `masks` ((B, S, S) in [0, 1]) are above 0, asking
        for `condition` and guiding away from `reference` (both (B, A)); returns the decoded images in [-1, 1]
        (the caller composites them). Outside the mask the image's latent is kept.

        start: "noise": inside the mask the sampler starts from the image's latent noised to t = `strength`
               (1: pure noise) with the seed's noise, with RePaint's `resample` rounds per step;
               "inversion": from the image's own ODE trajectory up to t = `strength`, integrated without
               guidance for the condition `source` (B, A) (the face as it is read), so that what the edit
               does not change comes back as it was. Heun's steps both ways: on 8 faces a round trip of 20
               steps to t = 0.8 and back lands within 61 dB of the start, where Euler's lands within 30 dB;
               "flowedit": sampling.flow_edit from t = `strength`, the source velocity unguided for `source`;
               "rf-inversion": sampling.rf_inversion, inverted with the same source velocity.
               (`resample` applies to "noise" alone.)
        framing: (B, 3) framing.features of the views the images are, for a framed model (None: whole faces).
        Item i's draws come from seeds[i] alone.
        """
        settings = settings or self.sample
        if start == "inversion":  # the face's own trajectory: no RePaint noise to settle the region with
            settings = dataclasses.replace(settings, method="heun")
        known = self.encode(images.to(self.device))
        mask = torch.cat([latent_mask(m, known.shape[-1]) for m in masks]).to(self.device)
        times = sampling.time_grid(settings.steps, start=strength, device=self.device)
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        # An inpainting model sees the mask and the known latent outside it as well
        inputs = {"context": inpainting_context(known, mask)} if self.dit.inpainting else {}
        if framing is not None:
            inputs["framing"] = framing.to(self.device)
        velocity = self._velocity(condition.to(self.device), reference.to(self.device), settings, inputs)
        as_read = guidance.conditional(self.dit, (condition if source is None else source).to(self.device), inputs)
        with self.autocast():
            if start == "flowedit":
                latents = sampling.flow_edit(as_read, velocity, known, times, generators=generators, mask=mask)
            elif start == "rf-inversion":
                latents = sampling.rf_inversion(as_read, velocity, known, times, generators=generators, mask=mask)
            else:
                if start == "inversion":
                    path, resample = sampling.invert(as_read, known, times, method=settings.method), 1
                else:
                    path = sampling.noised_path(known, self.noise(self.generators(seeds)).to(self.device), times)
                latents = sampling.sample_masked(velocity, path[0], times, known_path=path, mask=mask,
                                                 generators=generators, resample=resample, method=settings.method)
        return self.decode(latents).cpu()


def latent_mask(mask, latent_size):
    """A pixel mask (H, W) in [0, 1] -> a soft latent mask (1, 1, h, w): any latent cell the pixel mask
    touches is repainted, plus a one-cell soft border, since each latent cell decodes into a wider patch."""
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    cells = F.adaptive_max_pool2d(m, latent_size)
    grown = F.max_pool2d(cells, 3, stride=1, padding=1)
    return torch.maximum(cells, 0.5 * grown)
