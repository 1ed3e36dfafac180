"""The `facegen` command line: thin wrappers over the library, results' paths on stdout,
logs and progress bars on stderr, one-line errors and a non-zero exit code on bad input."""

import dataclasses
import functools
import gc
import secrets
from pathlib import Path
from typing import List, Optional

import typer

from .attributes import DEFAULT_ATTRIBUTES, describe, request_vector
from .config import load_preset, preset_names
from .errors import FacegenError
from .terminal import finite, log, pick_device, progress_bar, report_results, reports_errors, with_attribute_flags

# Heavy libraries (torch, numpy, PIL, torchvision) are imported inside the commands that use them, so that
# `facegen --help` and argument errors answer at once.

app = typer.Typer(help="Attribute-controlled faces from a latent Diffusion Transformer.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
MAX_SEED = 2**63 - 1  # torch generators take seeds below 2**64; seed + i stays there
MODEL_HELP = "Model folder, or a shipped model by name: faces (real faces; the default) or demo (built-in faces)."
PRECISION_HELP = ("auto (bf16 where the device runs it natively: about twice as fast; else fp32), fp32 (the same "
                  "bits on every machine) or bf16.")

data_app = typer.Typer(help="Labelled face data: built-in faces and aligned real photos.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
@reports_errors
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write (CelebA layout)."),
    count: int = typer.Option(1000, "--count", "-n", min=1, help="Number of faces."),
    size: int = typer.Option(128, min=16, help="Image side in pixels."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Face i is rendered from seed + i."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: all cores)."),
    labels: str = typer.Option("celeba", help="celeba: CelebA-like frequencies and dependencies (beards mostly "
                                              "on men); independent: every attribute half the time, whatever the "
                                              "others (for training the attribute classifier)."),
):
    """Render built-in faces with exact labels and landmarks into a CelebA-layout folder."""
    from .synthfaces import write_dataset

    with progress_bar() as progress:
        print(write_dataset(out, count, size, seed, workers, progress, label_distribution=labels))


@data_app.command("align")
@reports_errors
def data_align(
    src: Path = typer.Argument(..., help="Folder of labelled photos (any size; sub-folders searched)."),
    out: Path = typer.Argument(..., help="Folder to write (CelebA layout)."),
    attributes: Optional[Path] = typer.Option(None, help="Label file (CelebA's list_attr_celeba.txt format or a "
                                                         "CSV with a filename column), when not inside SRC."),
    size: int = typer.Option(128, min=16, help="Side of the aligned faces in pixels."),
    holdout: float = typer.Option(0.05, min=0.0, max=0.5, help="Share of the photos for each of the valid and test "
                                                                "splits, when the source has no partition file."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: all cores)."),
):
    """Align real photos to the model's framing (the landmarks and transform `edit` uses), CelebA layout."""
    from .align import align_dataset

    with progress_bar() as progress:
        counts = align_dataset(src, out, attributes, size, holdout, workers, progress, log)
    log(f"{counts['aligned']} of {counts['labelled']} aligned, {counts['no face']} no face, "
        f"{counts['unreadable']} unreadable, {counts['not found']} not found (listed in {out / 'not_aligned.txt'})")
    print(out)
    if counts["aligned"] < counts["labelled"]:
        raise typer.Exit(1)


vae_app = typer.Typer(help="The image autoencoder.", no_args_is_help=True)
app.add_typer(vae_app, name="vae")


@vae_app.command("train")
@reports_errors
def vae_train(
    data: Path = typer.Argument(..., help="Labelled image folder (its train and valid splits are used)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for OUT/vae, OUT/checkpoints and OUT/samples."),
    steps: int = typer.Option(4000, min=1),
    batch_size: int = typer.Option(16, min=1),
    learning_rate: float = typer.Option(1e-3),
    crop_size: int = typer.Option(128, min=8, help="Train on random crops of this size (faster; a multiple of 8)."),
    size: str = typer.Option("compact", help="Network size: compact (built-in faces) or faces (real photos)."),
    disc_start: Optional[int] = typer.Option(None, min=0, help="Step at which the patch discriminator's loss starts "
                                                               "(default: never)."),
    disc_weight: float = typer.Option(0.5, min=0.0, help="Weight of the adversarial loss (times the adaptive "
                                                         "balance)."),
    disc_warmup: int = typer.Option(0, min=0, help="Steps the discriminator learns alone, from --disc-start, "
                                                   "before its loss reaches the autoencoder."),
    precision: str = typer.Option("no", help="no or bf16 (autocast; pays on CPUs with AVX-512 BF16 and on GPUs)."),
    checkpoint_every: int = typer.Option(250, min=1, help="Steps between checkpoints and sample grids."),
    init: Optional[str] = typer.Option(None, help="Start from this autoencoder (a folder or hub id) instead of a "
                                                  "new one of --size."),
    decoder_only: bool = typer.Option(False, "--decoder-only", help="Train only the decoder of --init: its latents "
                                                                    "(and a DiT trained on them) stay valid."),
    resume: bool = typer.Option(False, "--resume"),
):
    """Train an f8 AutoencoderKL (128 px -> 16x16x4) on a data set; prints OUT/vae."""
    from .vae_train import train_vae

    with progress_bar(loss=".4f") as progress:
        train_vae(data, out, steps, batch_size, learning_rate, crop_size=crop_size, size=size, disc_start=disc_start,
                  disc_weight=disc_weight, precision=precision, resume=resume, checkpoint_every=checkpoint_every,
                  init=init, decoder_only=decoder_only, disc_warmup=disc_warmup, log=log, progress=progress)
    print(out / "vae")


@vae_app.command("eval")
@reports_errors
def vae_eval(
    data: Path = typer.Argument(..., help="Labelled image folder."),
    vae: str = typer.Option(..., help="The autoencoder: a save_pretrained folder or a hub id."),
    split: str = typer.Option("test", help="train, valid, test or all."),
    grid: Optional[Path] = typer.Option(None, help="Also write faces (top) above their reconstructions (bottom)."),
    columns: int = typer.Option(8, min=1, help="Faces in the grid."),
):
    """Measure an autoencoder's PSNR on held-out faces; prints the PSNR (and the grid's path)."""
    from .vae_train import evaluate_vae

    value, count = evaluate_vae(vae, data, split, grid, columns)
    log(f"{vae}: PSNR {value:.2f} dB on the {count} faces of {data} ({split})")
    print(f"{value:.4f}")
    if grid is not None:
        print(grid)


eval_app = typer.Typer(help="Measure models: the attribute classifier and the evaluation report.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
@reports_errors
def eval_report(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    classifier: Optional[Path] = typer.Option(None, help="Attribute classifier folder (facegen eval train-classifier; "
                                                   "default: the model folder's classifier/, as the demo has)."),
    out: Path = typer.Option(Path("eval-report"), "--out", "-o", help="Report folder."),
    faces: int = typer.Option(32, "--faces", "-k", min=1, help="Faces per condition (seeds 0..K-1)."),
    guidance: List[float] = typer.Option([1.0, 3.0, 5.0], callback=finite,
                                         help="Guidance scales to measure (repeatable)."),
    combinations: int = typer.Option(8, min=0, help="Random requests of 2-4 attributes to measure."),
    data: Optional[Path] = typer.Option(None, help="Labelled image folder: its test split is the real side of "
                                                     "the Fréchet distance, its train split's labels give the "
                                                     "free-flip ceiling."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default: the model's)."),
    inception_fid: bool = typer.Option(True, help="With --data, also the standard Inception FID (needs "
                                                  "`pip install -e '.[fid]'` and the Inception weights)."),
    inception_weights: Optional[Path] = typer.Option(None, help="Local copy of torch-fidelity's Inception weights "
                                                                "(offline machines; default: download)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Measure a model's attribute control and leakage; writes OUT/report.json, report.md and grids."""
    if ctx.invoked_subcommand is not None:
        return
    from .classifier import load_classifier
    from .evaluate import evaluate_model, inception_fid_to, load_held_out_faces
    from .pipeline import FacegenPipeline

    pipe = FacegenPipeline.load(model, pick_device(device), precision)
    if classifier is None:
        classifier = pipe.path / "classifier"  # a model folder may carry the classifier it was measured with
        if not classifier.is_dir():
            raise FacegenError(f"{pipe.path} carries no classifier: give --classifier "
                               "(train one with `facegen eval train-classifier --data D`)")
    attribute_classifier, classifier_report = load_classifier(classifier, pipe.device)
    held_out = load_held_out_faces(data, pipe.attributes, pipe.info.image_size) if data is not None else None
    fid_to = functools.partial(inception_fid_to, weights=inception_weights) if inception_fid else None
    with progress_bar() as progress:
        evaluate_model(pipe, attribute_classifier, classifier_report, out, faces, guidance, pipe.settings(steps=steps),
                       held_out, combinations, fid_to=fid_to, progress=progress)
    print(out / "report.md")


@eval_app.command("train-classifier")
@reports_errors
def eval_train_classifier(
    data: Path = typer.Option(..., help="Labelled image folder (train split to fit, test split to measure)."),
    out: Path = typer.Option(Path("classifier"), "--out", "-o", help="Folder to write the classifier to."),
    epochs: int = typer.Option(12, min=1),
    batch_size: int = typer.Option(64, min=1),
    image_size: int = typer.Option(64, min=16, help="The classifier reads faces at this size."),
    widths: str = typer.Option("16,32,64,128", help="Channels of its four stages (real photos: 32,64,128,256)."),
    balanced: bool = typer.Option(False, "--balanced", help="Weigh each attribute's positives by its rarity "
                                                            "(for real data such as CelebA, where some are 2%)."),
    test_data: List[Path] = typer.Option([], help="Another labelled folder whose test split it is measured on "
                                                  "too (repeatable)."),
):
    """Train the attribute classifier that measures generated and edited faces; prints its folder."""
    from .classifier import train_classifier

    try:
        stage_widths = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise FacegenError(f"--widths {widths!r}: give four channel counts such as 32,64,128,256") from None
    with progress_bar() as progress:
        scores, own_balanced = train_classifier(data, out, epochs, batch_size, image_size, also_test=test_data,
                                                widths=stage_widths, balanced=balanced, log=log, progress=progress)
    for folder, accuracies in scores.items():
        log(f"held-out accuracy on {folder}" + (" (balanced accuracy)" if folder == str(data) else "") + ":")
        for name, value in accuracies.items():
            extra = f"  ({100 * own_balanced[name]:5.1f}%)" if folder == str(data) else ""
            log(f"{name:>12}  {100 * value:5.1f}%{extra}")
    print(out)


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
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (faster where supported)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist (default: skip them)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """4x super-resolution with Real-ESRGAN x4plus (basicsr RRDBNet); prints each output's path."""
    from .files import check_output_folder, collect_inputs
    from .upscale import load_upscaler, upscale_files

    check_output_folder(out)
    files, problems = collect_inputs(inputs, recursive)
    if not files and not problems:
        raise FacegenError("no images in the inputs given")
    net = load_upscaler(weights, pick_device(device), log)
    results = upscale_files(net, files, out, scale, tile, tile_pad, bf16, overwrite)
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
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    strength: Optional[float] = typer.Option(None, min=0.05, max=1.0,
                                             help="How much to repaint: the sampler's start time (default 0.8; "
                                                  "1.0 for hair colours and bald, 0.7 for pale_skin and male)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, callback=finite,
                                             help="Classifier-free guidance (default: the model's)."),
    resample: int = typer.Option(2, min=1, help="RePaint resampling rounds per step (coherence at the mask edge)."),
    mask_grow: int = typer.Option(4, min=0, help="Grow the region mask by this many pixels (of the 128 crop)."),
    save_mask: bool = typer.Option(False, "--save-mask", help="Also write NAME.mask.png beside each output."),
    face: Optional[int] = typer.Option(None, min=0, help="Edit only face K (0 = leftmost); default: every face."),
    free_others: bool = typer.Option(False, "--free-others",
                                     help="Leave the other attributes free instead of as the classifier reads them."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed of the noise; same seed, same result."),
    batch_size: int = typer.Option(8, min=1, help="Photos per batch on the model's device."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0 even when some photos have no face."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist (default: skip them)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Change one feature of the faces in photos (--add mustache, --remove eyeglasses, ...); prints each output."""
    from .edit import EditRequest, check_request, edit_photos, without_masks
    from .files import check_output_folder, collect_inputs
    from .pipeline import FacegenPipeline

    if not add and not remove:
        raise FacegenError("nothing to change: give --add ATTRIBUTE and/or --remove ATTRIBUTE")
    if in_place and save_mask:
        raise FacegenError("--save-mask with --in-place would write NAME.mask.png among the photos (and take "
                           "them as photos next time); edit into --out to keep the masks")
    if not in_place:
        check_output_folder(out)
    pipe = FacegenPipeline.load(model, pick_device(device), precision)
    request = EditRequest(tuple(a.replace("-", "_") for a in add), tuple(r.replace("-", "_") for r in remove),
                          strength, pipe.settings(steps=steps, guidance=guidance), resample, mask_grow, seed)
    check_request(pipe.attributes, request)
    classifier = None if free_others else pipe.load_classifier()
    files, problems = collect_inputs(inputs, recursive)
    files, masks = without_masks(files)
    if masks:
        log(f"skipping {masks} mask(s) that --save-mask wrote (NAME.mask.png): they are not photos")
    if not files and not problems:
        raise FacegenError("no photos in the inputs given")
    results = edit_photos(pipe, files, request, None if in_place else out, classifier, face, save_mask, overwrite,
                          batch_size)
    counts = report_results(results, len(files), problems, "editing")
    if counts["unreadable"] + counts["failed"] or (counts["no face"] and not allow_missing):
        raise typer.Exit(1)


@app.command()
@reports_errors
def presets():
    """List the model presets with their parameter counts."""
    import torch

    from .model import LatentDiT

    for name in preset_names():
        preset = load_preset(name)
        with torch.device("meta"):
            model = LatentDiT(attributes=DEFAULT_ATTRIBUTES, **preset.model)
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
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Encode a labelled image data set into a latent cache that `facegen train` reads directly."""
    from .cache import encode_dataset

    with progress_bar() as progress:
        meta = encode_dataset(data, vae, out, image_size, split, batch_size, workers, pick_device(device),
                              progress, log)
    log(f"{meta['num_images']} latents of shape {meta['latent_shape']} in {out}"
        + (f"; {meta['num_unreadable']} unreadable images skipped" if meta["num_unreadable"] else ""))
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
    precision: Optional[str] = typer.Option(
        None, help="Mixed precision no, bf16 or fp16 (default: the preset's). bf16 pays on GPUs and on CPUs "
                   "with AVX-512 BF16 or AMX; on other CPUs it is slower than fp32 (no)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the model (default: on GPUs, not on CPUs)."),
):
    """Train a LatentDiT; the usable model lands in OUT/model."""
    from .train import train as run_training

    if precision not in (None, "no", "bf16", "fp16"):
        raise FacegenError(f"unknown precision {precision!r}; use no, bf16 or fp16")
    chosen = load_preset(preset)
    if precision:
        chosen = dataclasses.replace(chosen, train=dataclasses.replace(chosen.train, mixed_precision=precision))
    with progress_bar(loss=".4f", speed=".1f") as progress:
        model_path = run_training(chosen, data, out, vae, steps, batch_size, resume, log, progress,
                                  cooldown_steps, init_from, compile)
    if model_path:  # one line from a multi-process run: its main process's
        print(model_path)


@app.command()
@reports_errors
def export(
    model: Path = typer.Argument(..., help="Model folder (RUN/model from facegen train)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    half: bool = typer.Option(False, "--half", help="Store the weights in float16 (half the size)."),
    classifier: Optional[Path] = typer.Option(None, help="Attribute classifier to carry in OUT/classifier "
                                                           "(default: the model folder's own, if any)."),
    vae: Optional[str] = typer.Option(None, help="Another autoencoder with the model's encoder (a fine-tuned "
                                                 "decoder: `facegen vae train --decoder-only`) to carry instead."),
):
    """Copy a model folder, optionally in float16, with its classifier and another decoder; prints OUT."""
    import torch

    from .classifier import load_classifier, save_classifier
    from .pipeline import FacegenPipeline
    from .vae import load_vae

    dtype = torch.float16 if half else None
    pipe = FacegenPipeline.load(model)
    if vae is not None:
        pipe = pipe.with_vae(load_vae(vae), vae)
    pipe.save(out, dtype)
    classifier = classifier or (model / "classifier" if (model / "classifier").is_dir() else None)
    if classifier is not None:
        attribute_classifier, report = load_classifier(classifier)
        save_classifier(attribute_classifier.to(dtype) if half else attribute_classifier, out / "classifier", report)
    print(out)


@app.command()
@reports_errors
@with_attribute_flags
def generate(
    n: int = typer.Option(16, "-n", help="Number of faces."),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    out: Path = typer.Option(Path("faces"), "--out", "-o", help="Output folder."),
    seed: Optional[int] = typer.Option(None, min=0, max=MAX_SEED,
                                       help="Seed of the first face; face i uses seed + i."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, callback=finite,
                                             help="Classifier-free guidance scale (default: the model's)."),
    sampler: Optional[str] = typer.Option(None, help="euler or heun (default: the model's)."),
    grid: bool = typer.Option(False, "--grid", help="Also write all faces as one grid image."),
    upscale: Optional[float] = typer.Option(None, "--upscale", min=1.0, max=8.0,
                                            help="Super-resolve the faces (e.g. 4: 128 -> 512 px)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Faces per batch (default: 16 on a CPU; on a GPU "
                                                                "what its free memory holds)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace face files that exist (default: refuse)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    wanted: List[str] = (),
    unwanted: List[str] = (),
):
    """Generate faces with the asked-for attributes; the rest stay free."""
    from .files import check_output_folder
    from .pipeline import FacegenPipeline, save_faces

    if n < 1:
        raise FacegenError(f"-n must be at least 1, not {n}")
    check_output_folder(out)  # a bad --out fails now, not after the faces are made
    pipe = FacegenPipeline.load(model, pick_device(device), precision)
    y = request_vector(pipe.attributes, wanted, unwanted)
    seed = secrets.randbelow(2**31) if seed is None else seed
    seeds = list(range(seed, seed + n))
    paths = [out / f"face-{s:010d}.png" for s in seeds]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FacegenError(f"{existing[0]}" + (f" and {len(existing) - 1} more" if len(existing) > 1 else "")
                           + " exist; --overwrite replaces them, or choose another --out or --seed")
    settings = pipe.settings(steps=steps, guidance=guidance, method=sampler)
    log(f"generating {n} faces: {describe(pipe.attributes, y)}; seeds {seed}..{seed + n - 1}; {settings}")
    with progress_bar() as progress:
        task = progress.add_task("generating", total=n)
        images = pipe.generate(y, seeds, settings, batch_size, on_batch=lambda k: progress.advance(task, k))
    for path in save_faces(pipe, images, y, seeds, settings, paths, upscale=upscale, log=log,
                           grid=out / f"grid-{seed:010d}.png" if grid else None,
                           model_name=str(model) if model else pipe.path.name):
        print(path, flush=True)

@app.command()
@reports_errors
def ui(
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to serve on: loopback (this machine only) unless you "
                                               "give another, such as 0.0.0.0 (every network)."),
    port: int = typer.Option(7860, min=1, max=65535),
    out: Path = typer.Option(Path("facegen-ui"), "--out", "-o", help="Folder for the page's faces and edits."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """A local web page to generate and edit faces (needs the ui extra: pip install -e ".[ui]"); prints its URL."""
    from .files import check_output_folder
    from .pipeline import FacegenPipeline
    from .ui import build_app, import_gradio

    import_gradio()  # a missing extra fails before the model loads
    check_output_folder(out)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: serving on {host}: anyone who can reach this machine can use the page (it has no login)")
    pipe = FacegenPipeline.load(model, pick_device(device), precision)
    app = build_app(pipe, pipe.load_classifier(), out, str(model) if model else pipe.path.name)
    print(f"http://{host}:{port}", flush=True)
    app.launch(server_name=host, server_port=port, allowed_paths=[str(out.resolve())], share=False, quiet=True)


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
