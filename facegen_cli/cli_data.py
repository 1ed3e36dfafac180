"""`facegen data` and `facegen vae`: labelled face data (built-in faces, aligned photos) and the image
autoencoder. Thin over the library, as cli.py is."""

from pathlib import Path
from typing import Optional

import typer

from .terminal import Precision, Seed, log, progress_bar, reports_errors

data_app = typer.Typer(help="Labelled face data: built-in faces and aligned real photos.", no_args_is_help=True)


@data_app.command("synth")
@reports_errors
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write (CelebA layout)."),
    count: int = typer.Option(1000, "--count", "-n", min=1, help="Number of faces."),
    size: int = typer.Option(128, min=16, help="Image side in pixels."),
    seed: Seed = 0,
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: all cores)."),
    labels: str = typer.Option("celeba", help="celeba: CelebA-like frequencies and dependencies (beards mostly "
                                              "on men); independent: every attribute half the time, whatever the "
                                              "others (for training the attribute classifier)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a data set at OUT (never a folder of "
                                                              "other files)."),
):
    """Render built-in faces with exact labels and landmarks into a CelebA-layout folder (face i: seed + i)."""
    from .synthfaces import write_dataset

    with progress_bar() as progress:
        print(write_dataset(out, count, size=size, seed=seed, workers=workers, progress=progress,
                            label_distribution=labels, overwrite=overwrite))


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
    zoomed: bool = typer.Option(False, help="Write each photo as a zoomed view of its aligned face, as far as "
                                            "its own pixels hold (most of them; listed in OUT/list_framing.txt): "
                                            "the data of a framed model (presets/faces-framed.toml)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: all cores)."),
):
    """Align real photos to the model's framing (the landmarks and transform `edit` uses), CelebA layout."""
    from .align import align_dataset

    with progress_bar() as progress:
        counts = align_dataset(src, out, attributes=attributes, size=size, holdout=holdout, zoomed=zoomed,
                               workers=workers, progress=progress)
    log(f"{counts.aligned} of {counts.labelled} aligned, {counts.no_face} no face, {counts.unreadable} unreadable, "
        f"{counts.not_found} not found, {counts.failed} failed (listed in {out / 'not_aligned.txt'})")
    print(out)
    if counts.aligned < counts.labelled:
        raise typer.Exit(1)


vae_app = typer.Typer(help="The image autoencoder.", no_args_is_help=True)


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
    feature_weight: float = typer.Option(0.0, min=0.0, help="Weight of the discriminator feature-matching loss, "
                                                            "beside the adversarial one (pix2pixHD)."),
    disc_warmup: int = typer.Option(0, min=0, help="Steps the discriminator learns alone, from --disc-start, "
                                                   "before its loss reaches the autoencoder."),
    precision: Precision = "fp32",
    checkpoint_every: int = typer.Option(250, min=1, help="Steps between checkpoints and sample grids."),
    init: Optional[str] = typer.Option(None, help="Start from this autoencoder (a folder or hub id) instead of a "
                                                  "new one of --size."),
    decoder_only: bool = typer.Option(False, "--decoder-only", help="Train only the decoder of --init: its latents "
                                                                    "(and a DiT trained on them) stay valid."),
    layers_per_block: Optional[int] = typer.Option(None, min=1, help="Resnets per block (default: the size's); with "
                                                                     "--init, that autoencoder deepened, starting as "
                                                                     "exactly it."),
    resume: bool = typer.Option(False, "--resume"),
):
    """Train an f8 AutoencoderKL (128 px -> 16x16x4) on a data set; prints OUT/vae."""
    from .vae_train import VaeTrainConfig, train_vae

    config = VaeTrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, crop_size=crop_size,
                            size=size, disc_start=disc_start, disc_weight=disc_weight, disc_warmup=disc_warmup,
                            feature_weight=feature_weight,
                            precision=precision, checkpoint_every=checkpoint_every, init=init,
                            decoder_only=decoder_only, layers_per_block=layers_per_block)
    with progress_bar(loss=".4f") as progress:
        train_vae(data, out, config, resume=resume, progress=progress)
    print(out / "vae")


@vae_app.command("eval")
@reports_errors
def vae_eval(
    data: Path = typer.Argument(..., help="Labelled image folder."),
    vae: str = typer.Option(..., help="The autoencoder: a save_pretrained folder or a hub id."),
    split: str = typer.Option("test", help="train, valid, test or all."),
    grid: Optional[Path] = typer.Option(None, help="Also write faces (top) above their reconstructions (bottom)."),
    columns: int = typer.Option(8, min=1, help="Faces in the grid."),
    identity: bool = typer.Option(False, "--identity", help="Also measure dlib's identity distance and Fréchet "
                                                            "distance of the reconstructions (the identity extra)."),
    identity_faces: int = typer.Option(200, min=2, help="Faces measured for --identity; the rest of the split is "
                                                        "the real reference."),
    report: Optional[Path] = typer.Option(None, help="Also write the figures to this JSON file."),
):
    """Measure an autoencoder on held-out faces; prints the PSNR (and the grid's and report's paths)."""
    from .files import write_json
    from .vae_train import evaluate_vae

    figures = evaluate_vae(vae, data, split, grid, columns, identity=identity, identity_faces=identity_faces)
    log(f"{vae}: PSNR {figures.psnr:.2f} dB on the {figures.faces} faces of {data} ({split})")
    if identity:
        log(f"identity distance median {figures.identity_median:.3f} ({figures.identity_crossed:.0%} at 0.6 or "
            f"more), Fréchet distance {figures.frechet:.4f} (real faces: {figures.frechet_floor:.4f}), "
            f"on {figures.identity_faces} faces")
    print(f"{figures.psnr:.4f}")
    if grid is not None:
        print(grid)
    if report is not None:
        write_json(report, figures.to_dict())
        print(report)
