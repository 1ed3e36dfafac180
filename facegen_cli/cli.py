"""The `facegen` command line: thin wrappers over the library, results' paths on stdout,
logs and progress bars on stderr, one-line errors and a non-zero exit code on bad input."""

import dataclasses
import gc
import secrets
from pathlib import Path
from typing import List, Optional

import typer

from .cli_data import data_app, vae_app
from .cli_eval import eval_app
from .config import SAMPLERS, load_preset, preset_names
from .edit_request import EditRequest, edit_sample, guidance_help, strength_help
from .errors import FacegenError
from .terminal import (MAX_SEED, Device, Model, Precision, Seed, finite, load_pipeline, log, progress_bar,
                       report_results, reports_errors, with_attribute_flags)

# Heavy libraries (torch, numpy, PIL, torchvision) are imported inside the commands that use them, so that
# `facegen --help` and argument errors answer at once.

app = typer.Typer(help="Attribute-controlled faces from a latent Diffusion Transformer.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
EDIT = EditRequest()  # the edit's defaults, which its options show
MAX_FACES = 10_000_000  # faces one generate makes
app.add_typer(data_app, name="data")
app.add_typer(vae_app, name="vae")
app.add_typer(eval_app, name="eval")


@app.command()
@reports_errors
def upscale(
    inputs: List[str] = typer.Argument(..., help="Images, folders, or - for paths on stdin."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (same names and formats)."),
    scale: float = typer.Option(4.0, min=0.25, max=8.0, help="Output scale; x4plus runs at 4, then resizes."),
    tile: int = typer.Option(256, min=0, help="Tile size in input pixels (0: whole image at once)."),
    tile_pad: int = typer.Option(10, min=0, help="Context pixels around each tile."),
    weights: Optional[Path] = typer.Option(None, help="RRDBNet weights (.pth or .safetensors)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist (default: skip them)."),
    device: Device = "auto",
    precision: Precision = "fp32",
):
    """4x super-resolution with Real-ESRGAN x4plus (basicsr RRDBNet); prints each output's path."""
    from .devices import pick_device, resolve_precision
    from .files import check_output_folder, collect_inputs
    from .upscale import load_upscaler, upscale_files

    check_output_folder(out)
    files, problems = collect_inputs(inputs, recursive)
    if not files and not problems:
        raise FacegenError("no images in the inputs given")
    device = pick_device(device)
    net = load_upscaler(weights, device)
    results = upscale_files(net, files, out, outscale=scale, tile=tile, tile_pad=tile_pad,
                            precision=resolve_precision(precision, device), overwrite=overwrite)
    counts = report_results(results, len(files), problems, "upscaling")
    if counts["unreadable"] + counts["failed"]:
        raise typer.Exit(1)


@app.command()
@reports_errors
def edit(
    inputs: List[str] = typer.Argument(..., help="Photos, folders, or - for paths on stdin."),
    add: List[str] = typer.Option([], "--add", help="Attribute to give the face (repeatable)."),
    remove: List[str] = typer.Option([], "--remove", help="Attribute to take away (repeatable)."),
    out: Path = typer.Option(Path("edited"), "--out", "-o", help="Output folder (same names and formats)."),
    in_place: bool = typer.Option(False, "--in-place", help="Overwrite the input photos instead."),
    model: Model = None,
    strength: Optional[float] = typer.Option(None, min=0.05, max=1.0, help=strength_help()),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default: as many as the model's sampler "
                                                          "makes model calls)."),
    guidance: Optional[float] = typer.Option(None, callback=finite,
                                             help=guidance_help()),
    trajectory: str = typer.Option(EDIT.trajectory, help="How the region is repainted: flowedit (along the "
                                                          "change's velocity difference, no inversion), inversion "
                                                          "(from the face's own trajectory), rf-inversion (a "
                                                          "controlled inversion, then drawn back towards the face) "
                                                          "or noise (fresh noise, "
                                                          "RePaint's resampling)."),
    resample: int = typer.Option(EDIT.resample, min=1, help="RePaint resampling rounds per step, with --trajectory "
                                                            "noise (coherence at the mask edge)."),
    mask_grow: int = typer.Option(EDIT.mask_grow, min=0, help="Grow the region mask by this many pixels (of the "
                                                              "aligned crop)."),
    upscale: bool = typer.Option(EDIT.upscale, "--upscale/--no-upscale",
                                 help="Super-resolve the new content (Real-ESRGAN x4plus) of faces at least 1.5x the "
                                      "model's 128-px framing in their photo."),
    zoom: bool = typer.Option(EDIT.zoom, "--zoom/--no-zoom",
                              help="With a framed model: repaint a small region (a mustache, the eyes) in a zoomed "
                                   "view of the face, as close as the photo's own pixels hold."),
    save_mask: bool = typer.Option(False, "--save-mask", help="Also write NAME.EXT.mask.png beside each output."),
    face: Optional[int] = typer.Option(None, min=0, help="Edit only face K (0 = leftmost); default: every face."),
    free_others: bool = typer.Option(False, "--free-others",
                                     help="Leave the other attributes free instead of as the classifier reads them."),
    seed: Seed = EDIT.seed,
    batch_size: int = typer.Option(8, min=1, help="Photos per batch on the model's device."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0 even when some photos have no face."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist (default: skip them)."),
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Change one feature of the faces in photos (--add mustache, --remove eyeglasses, ...); prints each output."""
    from .edit import edit_photos, without_masks
    from .files import check_output_folder, collect_inputs

    if not add and not remove:
        raise FacegenError("nothing to change: give --add ATTRIBUTE and/or --remove ATTRIBUTE")
    if in_place and save_mask:
        raise FacegenError("--save-mask with --in-place would write NAME.EXT.mask.png among the photos (and take "
                           "them as photos next time); edit into --out to keep the masks")
    if not in_place:
        check_output_folder(out)
    pipe = load_pipeline(model, device, precision)
    request = EditRequest(add=tuple(add), remove=tuple(remove), strength=strength,
                          sample=edit_sample(pipe.sample, steps), guidance=guidance, resample=resample,
                          trajectory=trajectory, mask_grow=mask_grow, upscale=upscale, zoom=zoom, seed=seed)
    request.attributes(pipe.attributes)  # an unknown or contradictory change fails before any photo is read
    classifier = None if free_others else pipe.load_classifier()
    files, problems = collect_inputs(inputs, recursive)
    files, masks = without_masks(files)
    if masks:
        log(f"skipping {masks} mask(s) that --save-mask wrote (NAME.EXT.mask.png): they are not photos")
    if not files and not problems:
        raise FacegenError("no photos in the inputs given")
    results = edit_photos(pipe, files, request, None if in_place else out, classifier=classifier, face=face,
                          save_mask=save_mask, overwrite=overwrite, batch_size=batch_size)
    counts = report_results(results, len(files), problems, "editing")
    if counts["unreadable"] + counts["failed"] or (counts["no face"] and not allow_missing):
        raise typer.Exit(1)


@app.command()
@reports_errors
def presets():
    """List the model presets with their parameter counts."""
    import torch

    from .attributes import DEFAULT_ATTRIBUTES

    for name in preset_names():
        preset = load_preset(name)
        with torch.device("meta"):
            model = preset.model.build(DEFAULT_ATTRIBUTES)
        count = sum(p.numel() for p in model.parameters())
        print(f"{name}\t{count / 1e6:.1f}M\t{preset.description}")


@app.command()
@reports_errors
def encode(
    data: Path = typer.Argument(..., help="CelebA-layout folder or folder with attributes.csv."),
    out: Path = typer.Option(..., "--out", "-o", help="Latent cache folder to write (or resume)."),
    vae: str = typer.Option("stabilityai/sd-vae-ft-mse", help="AutoencoderKL: hub id or local folder."),
    image_size: int = typer.Option(128, help="Square resolution the images are resized to."),
    split: str = typer.Option("all", help="all, train, valid or test (CelebA partition file)."),
    batch_size: int = typer.Option(32, min=1),
    workers: int = typer.Option(2, min=0, help="Image-decoding worker processes."),
    device: Device = "auto",
):
    """Encode a labelled image data set into a latent cache that `facegen train` reads directly."""
    from .cache import encode_dataset
    from .devices import pick_device

    with progress_bar() as progress:
        meta = encode_dataset(data, vae, out, image_size=image_size, split=split, batch_size=batch_size,
                              workers=workers, device=pick_device(device), progress=progress)
    log(f"{meta.num_images} latents of shape {meta.latent_shape} in {out}"
        + (f"; {meta.num_unreadable} unreadable images skipped" if meta.num_unreadable else ""))
    print(out)


@app.command()
@reports_errors
def train(
    data: Path = typer.Option(..., help="Latent cache (facegen encode) or labelled image folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints, samples, model/."),
    preset: str = typer.Option("dit-s", help=f"Preset name ({', '.join(preset_names())}) or .toml file."),
    vae: Optional[str] = typer.Option(None, help="VAE for image folders (default stabilityai/sd-vae-ft-mse)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Train to this step (default: the preset's)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Global batch size (default: the preset's)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    cooldown_steps: Optional[int] = typer.Option(
        None, min=0, help="Decay the learning rate linearly to 0 over the last N steps before --steps "
                          "(default: the preset's; 0 = constant to the end)."),
    init_from: Optional[Path] = typer.Option(
        None, help="Start from this model folder's weights (e.g. facegen_cli/demo) instead of from scratch: "
                   "fine-tuning. It must match the preset, the attributes and the latents' VAE."),
    other_vae: bool = typer.Option(False, "--other-vae", help="With --init-from: the latents are another "
                                                              "autoencoder's (a retrained encoder); the DiT's "
                                                              "weights carry over, the latents' statistics and "
                                                              "VAE are the new model's."),
    latent_stats_from: Optional[Path] = typer.Option(
        None, help="Normalise the latents with this model folder's statistics instead of the cache's, so that "
                   "the new model reads the same inputs (an autoguidance guide for that model)."),
    precision: Precision = None,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the model (default: on GPUs, not on CPUs)."),
):
    """Train a LatentDiT (precision: the preset's unless given); the usable model lands in OUT/model."""
    from .train import train as run_training

    chosen = load_preset(preset).with_train(max_steps=steps, batch_size=batch_size, cooldown_steps=cooldown_steps,
                                            precision=precision)
    with progress_bar(loss=".4f", speed=".1f") as progress:
        model_path = run_training(chosen, data, out, vae_source=vae, resume=resume, init_from=init_from,
                                  other_vae=other_vae, latent_stats_from=latent_stats_from, compile=compile,
                                  progress=progress)
    if model_path:  # one line from a multi-process run: its main process's
        print(model_path)


@app.command()
@reports_errors
def distill(
    data: Path = typer.Option(..., help="Latent cache of the model's training faces, encoded by its autoencoder "
                                        "(facegen encode --vae MODEL/vae)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints, model/."),
    model: Model = None,
    steps: Optional[int] = typer.Option(None, min=1, help="Distil to this step (default: 5000)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size (default: 64)."),
    few_steps: Optional[int] = typer.Option(None, min=1, help="The student's default sampling steps (default: 4)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    init_student: Optional[Path] = typer.Option(None, help="A student of the same model (an earlier run's "
                                                           "RUN/model) to go on distilling from, instead of the "
                                                           "model's own DiT."),
    precision: Precision = "auto",
):
    """Distil a model into a student that samples in one call per step and in a few steps (guidance and step
    size as its inputs); the student's model folder lands in OUT/model."""
    from .distill import DistillConfig, distill as run_distillation
    from .pipeline import model_path

    given = {"max_steps": steps, "batch_size": batch_size, "few_steps": few_steps, "precision": precision}
    cfg = DistillConfig(**{key: value for key, value in given.items() if value is not None})
    with progress_bar(loss=".4f", speed=".1f") as progress:
        print(run_distillation(model_path(model), data, out, cfg=cfg, resume=resume, init_student=init_student,
                               progress=progress))


@app.command()
@reports_errors
def export(
    model: str = typer.Argument(..., help="Model folder (RUN/model from facegen train), or a shipped model by "
                                          "name (faces, demo; a folder of that name: ./faces)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    half: bool = typer.Option(False, "--half", help="Store the weights in float16 (half the size)."),
    classifier: Optional[Path] = typer.Option(None, help="Attribute classifier to carry in OUT/classifier "
                                                           "(default: the model folder's own, if any)."),
    vae: Optional[str] = typer.Option(None, help="Another autoencoder with the model's encoder (a fine-tuned "
                                                 "decoder: `facegen vae train --decoder-only`) to carry instead."),
    labels: Optional[Path] = typer.Option(None, help="Labelled folder whose train split's label combinations "
                                                     "become the model's label prior (MODEL/labels.json), which "
                                                     "`generate` draws the attributes not asked for from."),
    ema_length: Optional[float] = typer.Option(
        None, min=0.001, max=0.28, help="Reconstruct the DiT's weights as the post-hoc EMA of this relative width "
                                        "(e.g. 0.05-0.15) from the run's snapshots (a preset with "
                                        "posthoc_ema_every)."),
    snapshots: Optional[Path] = typer.Option(None, help="Post-hoc EMA snapshot folder (default: RUN/ema-snapshots "
                                                        "beside the model folder RUN/model)."),
    guide: Optional[Path] = typer.Option(None, help="A smaller model of the same latents and attributes, trained for "
                                                    "less (preset faces-guide), to carry as the autoguidance guide "
                                                    "(OUT/guide)."),
    autoguidance: Optional[float] = typer.Option(None, callback=finite, help="The weight generated faces are "
                                                                             "autoguided with (with --guide, or the "
                                                                             "model's own guide)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model folder at OUT (never a folder of "
                                                              "other files)."),
):
    """Copy a model folder, optionally in float16, with its classifier, another decoder and a label prior;
    prints OUT."""
    from .export import export_model

    print(export_model(model, out, half=half, classifier=classifier, vae=vae, labels=labels, ema_length=ema_length,
                       snapshots=snapshots, guide=guide, autoguidance=autoguidance, overwrite=overwrite))


@app.command()
@reports_errors
@with_attribute_flags
def generate(
    n: int = typer.Option(16, "-n", help="Number of faces."),
    model: Model = None,
    out: Path = typer.Option(Path("faces"), "--out", "-o", help="Output folder."),
    seed: Seed = None,
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, callback=finite,
                                             help="Classifier-free guidance scale (default: the model's)."),
    drawn_guidance: Optional[float] = typer.Option(None, callback=finite,
                                                   help="Guidance of the attributes drawn from the label prior "
                                                        "(default: the model's; the asked ones get --guidance)."),
    autoguidance: Optional[float] = typer.Option(None, callback=finite,
                                                 help="Autoguidance weight by the model's guide, in place of "
                                                      "--drawn-guidance (default: the model's, where it carries a "
                                                      "guide); 0 turns it off."),
    sampler: Optional[str] = typer.Option(None, help=f"{', '.join(SAMPLERS)} (default: the model's)."),
    eta: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="The stochastic sampler's share of each "
                                                                       "step's noise drawn afresh (default: the "
                                                                       "model's)."),
    distilled: Optional[bool] = typer.Option(None, "--distilled/--no-distilled",
                                             help="A distilled model's student, one call per step, guidance and "
                                                  "step size its inputs, or its teacher with classifier-free "
                                                  "guidance (13 Heun steps unless --steps); default: the model's."),
    grid: bool = typer.Option(False, "--grid", help="Also write all faces as one grid image."),
    upscale: Optional[float] = typer.Option(None, "--upscale", min=1.0, max=8.0,
                                            help="Super-resolve the faces (e.g. 4: 128 -> 512 px)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Faces per batch (default: 16 on a CPU; on a GPU "
                                                                "what its free memory holds)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace face files that exist (default: refuse)."),
    prior: bool = typer.Option(True, "--prior/--no-prior", help="Draw the attributes not asked for from the "
                                                                "training faces' label combinations and guide "
                                                                "each face to them (where the model carries "
                                                                "them), or leave them free: unguided with "
                                                                "nothing asked."),
    device: Device = "auto",
    precision: Precision = "auto",
    wanted: List[str] = (),
    unwanted: List[str] = (),
):
    """Generate faces with the asked-for attributes (face i from seed + i); the rest stay free."""
    from .attributes import AttributeRequest
    from .files import check_output_folder
    from .gallery import FaceWriter, face_paths, make_faces, refuse_existing

    if not 1 <= n <= MAX_FACES:
        raise FacegenError(f"-n must be from 1 to {MAX_FACES:,}, not {n}")
    check_output_folder(out)  # a bad --out fails now, not after the faces are made
    pipe = load_pipeline(model, device, precision)
    request = AttributeRequest(pipe.attributes, wanted, unwanted)
    seed = secrets.randbelow(2**31) if seed is None else seed
    if seed + n - 1 > MAX_SEED:
        raise FacegenError(f"--seed {seed} with -n {n} runs past the largest seed, {MAX_SEED}")
    seeds = list(range(seed, seed + n))
    refuse_existing(face_paths(out, seeds), overwrite)
    sample = pipe.sample.undistilled() if distilled is False else pipe.sample
    if distilled and pipe.student is None:
        raise FacegenError(f"{pipe.path} is not distilled (facegen distill makes a student); leave out --distilled")
    settings = sample.overridden(steps=steps, guidance=guidance, method=sampler, eta=eta, drawn_guidance=drawn_guidance,
                                 autoguidance=autoguidance or None, distilled=distilled or None)
    if autoguidance == 0:
        settings = dataclasses.replace(settings, autoguidance=None)
    elif autoguidance is not None and pipe.guide is None:
        raise FacegenError(f"{pipe.path} carries no autoguidance guide (MODEL/guide); leave out --autoguidance")
    log(f"generating {n} faces: {request.describe()}; seeds {seed}..{seed + n - 1}; {settings}")
    writer = FaceWriter(pipe, request, settings, out, upscale=upscale, grid=grid,
                        model_name=str(model) if model else pipe.path.name, overwrite=overwrite)
    with progress_bar() as progress:  # each batch written as it is made: Ctrl-C keeps what was done
        task = progress.add_task("generating", total=n)
        for paths in make_faces(pipe, request, seeds, settings, writer, prior=prior, batch_size=batch_size,
                                    on_batch=lambda k: progress.advance(task, k)):
            for path in paths:
                print(path, flush=True)
    if (grid_file := writer.finish()) is not None:
        print(grid_file, flush=True)


@app.command()
@reports_errors
def ui(
    model: Model = None,
    host: str = typer.Option("127.0.0.1", help="Address to serve on: loopback (this machine only) unless you "
                                               "give another, such as 0.0.0.0 (every network)."),
    port: int = typer.Option(7860, min=1, max=65535),
    out: Path = typer.Option(Path("facegen-ui"), "--out", "-o", help="Folder for the page's faces and edits."),
    device: Device = "auto",
    precision: Precision = "auto",
):
    """A local web page to generate and edit faces (needs the ui extra); prints its URL. Ctrl-C stops it."""
    from .files import check_output_folder
    from .ui import build_app, import_gradio, serve

    import_gradio()  # a missing extra fails before the model loads
    check_output_folder(out)
    check_port_free(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: serving on {host}: anyone who can reach this machine can use the page (it has no login)")
    pipe = load_pipeline(model, device, precision)
    page = build_app(pipe, pipe.load_classifier(), out, str(model) if model else pipe.path.name)
    print(f"http://{host}:{port}", flush=True)
    serve(page, host, port, allowed=[str(out.resolve())])


def check_port_free(host, port):
    """Fail in one line, before the model loads, when another program serves on host:port (the page's URL
    would lead to that program's page)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise FacegenError(f"cannot serve on {host}:{port}: {e.strerror or e}; choose another --port") from None


def main():
    """The `facegen` program. After the command, the objects it made are frozen out of the garbage
    collector, so that the interpreter's exit does not walk them all: with torch and diffusers loaded, that
    walk alone took 1.1 s of a 6 s `facegen generate` on 2 cores. Everything is written and flushed by then."""
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
